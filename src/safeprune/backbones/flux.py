"""`flux`: FLUX.1 (Black Forest Labs 2024; FluxPipeline, FluxTransformer2DModel: MMDiT double blocks, then
single-stream blocks).

Text: T5's token states are the sequence the transformer attends to, CLIP-L's pooled output its global
conditioning (the pipeline's own `encode_prompt`). Latents enter packed into 2x2 patches,
(B, C, h, w) -> (B, hw/4, 4C), with per-token position ids for the rotary embedding; `predict` packs and
unpacks with the pipeline's own helpers, so everything outside sees (B, C, h, w) like the other families.
Training as diffusers' train_dreambooth_flux.py: rectified flow with t drawn uniformly (its default
weighting_scheme "none") from the scheduler's table, the transformer called at t / 1000, and for
guidance-distilled checkpoints (FLUX.1-dev, `guidance_embeds`) the guidance embedding at `guidance` (3.5,
the trainer's default). Sampling uses that embedded guidance, not classifier-free guidance (no negative
prompt). Feature KD matches the image stream after every double and single block; the text stream's key /
value projections of the double blocks are the cross-attention set, as in SD3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from safeprune.backbones.base import PromptEmbeddings, encode_in_chunks
from safeprune.backbones.sd3 import SD3, depth_pairs


@dataclass(frozen=True)
class Flux(SD3):
    name: str = "flux"
    label: str = "a Flux-class MMDiT (FluxTransformer2DModel)"  # how messages name the family
    pipelines: tuple[str, ...] = ("FluxPipeline",)
    pipeline_class: str = "FluxPipeline"
    denoiser_classes: tuple[str, ...] = ("FluxTransformer2DModel", "PrunedFluxTransformer2DModel")
    timestep_density: str = "uniform"
    max_sequence_length: int = 512  # T5 tokens (FLUX.1-dev's)
    guidance: float = 3.5  # the guidance embedding's value in training (guidance-distilled checkpoints)
    guidance_rows: int = 1  # guidance is an embedding of one conditional call (`guided`)

    @property
    def text_tokens(self) -> int:
        return self.max_sequence_length  # the transformer reads T5's tokens only (CLIP gives the pooled vector)

    def native_latent_size(self, pipe):
        return pipe.default_sample_size  # the transformer config has no sample size (it is resolution-free)

    @staticmethod
    def latent_channels(config) -> int:
        return config.in_channels // 4  # the transformer takes 2x2-packed latents

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device, resolution: int = 0) -> PromptEmbeddings:
        def call(chunk):
            emb, pool, _ = pipe.encode_prompt(chunk, chunk, device=device, num_images_per_prompt=1,
                                              max_sequence_length=self.max_sequence_length)
            return emb, pool

        return PromptEmbeddings(*encode_in_chunks((pipe.text_encoder, pipe.text_encoder_2), device, prompts, call))

    def last_word_index(self, pipe, prompts: list[str]) -> list[int]:
        """The transformer reads T5's tokens (words, EOS; no BOS): the last word is at n - 2 of n tokens."""
        tok = pipe.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               return_tensors="pt")
        return [max(int(n) - 2, 0) for n in tok.attention_mask.sum(1)]

    def sampling_scheduler(self, scheduler, denoiser, steps: int, latent_shape: tuple[int, ...]):
        """FluxPipeline's timesteps: sigmas linspace(1, 1/steps), shifted by mu of the packed token count."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        tokens = latent_shape[-2] * latent_shape[-1] // 4
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=self._shift(scheduler, tokens, 1.15))
        return scheduler

    def guided(self, model, x, t, emb, null, guidance: float) -> torch.Tensor:
        """FluxPipeline's guidance: FLUX.1-dev is guidance-distilled, so `guidance` enters as the guidance
        embedding of one conditional call (no classifier-free pair, the pipeline's true_cfg_scale 1); a model
        without the embedding (schnell) is sampled unguided, as its pipeline does."""
        return self.predict(model, x, t.expand(x.shape[0]), emb, guidance=guidance)

    def predict(self, model, x_t, timesteps, emb: PromptEmbeddings, guidance: float | None = None) -> torch.Tensor:
        """`guidance`: the guidance embedding's value (default: the training value, `self.guidance`)."""
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)  # (B, hw/4, 4C)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(emb.hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        config = getattr(model, "module", model).config  # through a DDP wrapper too
        value = self.guidance if guidance is None else guidance
        guidance = torch.full((b,), value, device=x_t.device) if config.guidance_embeds else None
        out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                    pooled_projections=emb.pooled, encoder_hidden_states=emb.hidden, txt_ids=txt_ids,
                    img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)  # (B, C, h, w): a factor 1 keeps latent units

    def match_blocks(self, teacher, student, kept: dict | None = None) -> list[tuple[str, str]]:
        kept = kept or {}
        return [pair for stack in ("transformer_blocks", "single_transformer_blocks")
                for pair in depth_pairs(len(getattr(teacher, stack)), len(getattr(student, stack)), stack,
                                        kept.get(stack))]

    def draw(self, pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float,
             size: dict) -> np.ndarray:
        b, c, h, w = latents.shape
        scale = pipe.vae_scale_factor
        return pipe(prompt=prompts, latents=pipe._pack_latents(latents, b, c, h, w), num_inference_steps=steps,
                    guidance_scale=guidance, output_type="np", max_sequence_length=self.max_sequence_length,
                    height=h * scale, width=w * scale).images
