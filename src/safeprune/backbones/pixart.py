"""`pixart`: PixArt-alpha / PixArt-sigma (Chen et al. 2023 / 2024; PixArtAlphaPipeline / PixArtSigmaPipeline,
PixArtTransformer2DModel: a DiT with cross-attention to T5).

Text: T5's token states padded to the pipeline's max_sequence_length (alpha 120, sigma 300) WITH their
attention mask (the pipeline's `encode_prompt`); the transformer takes it as `encoder_attention_mask`, so the
padding tokens are not attended to, and the mask travels with the states (`PromptEmbeddings.mask`). Micro-
conditioning (PixArt-alpha Sec. 2.3, the 1024 px models only): the image's (height, width) and aspect ratio
through `added_cond_kwargs`; diffusers gives them exactly when the transformer's sample_size is 128, in its
pipeline and in examples/research_projects/pixart/train_pixart_controlnet_hf.py, so here too; they are kept
per prompt in `PromptEmbeddings.time_ids` as (height, width, height / width), None otherwise.
Training as that script: DDPM noising, target eps (or v), and with learned sigma (out_channels = 2 x latent
channels, the released checkpoints' 8) the loss applies to the first half of the output only,
`model_pred.chunk(2, dim=1)[0]`: the second half is the IDDPM variance that diffusers' PixArt pipelines drop
before every scheduler step, so `predict` drops it too and every loss (L_ft, output KD, the upper level) sees
the eps half. Feature KD matches the output of every transformer block (`depth_pairs` pairs a depth-pruned
student by relative depth, as for SD3); the cross-attention is `attn2`, as in the UNet.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from safeprune.backbones.base import PromptEmbeddings, encode_in_chunks
from safeprune.backbones.sd import SD
from safeprune.backbones.sd3 import depth_pairs

ALPHA_T5_TOKENS = 120  # PixArtAlphaPipeline's default max_sequence_length (sigma's: 300)
MICRO_CONDITIONED_SAMPLE_SIZE = 128  # latent side of the 1024 px PixArt-alpha models (diffusers' rule)


@dataclass(frozen=True)
class PixArt(SD):
    name: str = "pixart"
    label: str = "a PixArt transformer (PixArtTransformer2DModel)"  # how messages name the family
    pipelines: tuple[str, ...] = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    pipeline_class: str = "PixArtAlphaPipeline"  # the default; a folder's model_index.json names its own
    denoiser: str = "transformer"
    denoiser_classes: tuple[str, ...] = ("PixArtTransformer2DModel", "PrunedPixArtTransformer2DModel")
    load_kwargs: dict = field(default_factory=dict)

    @property
    def text_tokens(self) -> int:
        return ALPHA_T5_TOKENS

    def owns_config(self, config: dict) -> bool:
        return config.get("_class_name") in self.denoiser_classes

    # -- the pipeline: alpha and sigma share the transformer, so one family loads either class
    def load_pipeline(self, folder, components: dict):
        index = Path(folder) / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        family = dataclasses.replace(self, pipeline_class=name) if name in self.pipelines else self
        return SD.load_pipeline(family, folder, components)

    def assemble(self, pipe, denoiser):
        return type(pipe)(**{**pipe.components, self.denoiser: denoiser})

    # -- text and the denoiser call
    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device, resolution: int = 0) -> PromptEmbeddings:
        def call(chunk):  # the pipeline's default max_sequence_length, which `draw` uses as well
            emb, mask, _, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False, device=device,
                                                 clean_caption=False)
            return emb, mask.long()

        hidden, mask = encode_in_chunks((pipe.text_encoder,), device, prompts, call)  # (P, L, D), (P, L) 1 = token
        micro = None
        if pipe.transformer.config.sample_size == MICRO_CONDITIONED_SAMPLE_SIZE:
            side = float(resolution or pipe.transformer.config.sample_size * pipe.vae_scale_factor)
            micro = torch.tensor([[side, side, 1.0]], device=device).expand(len(prompts), -1)  # square images
        return PromptEmbeddings(hidden, time_ids=micro, mask=mask)

    def predict(self, model, x_t, timesteps, emb: PromptEmbeddings) -> torch.Tensor:
        micro = emb.time_ids
        added = {"resolution": None, "aspect_ratio": None} if micro is None else \
            {"resolution": micro[:, :2].to(x_t.dtype), "aspect_ratio": micro[:, 2:].to(x_t.dtype)}
        out = model(x_t, encoder_hidden_states=emb.hidden, encoder_attention_mask=emb.mask, timestep=timesteps,
                    added_cond_kwargs=added).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: (eps, variance) on the channel axis; keep eps
            out = out.chunk(2, dim=1)[0]
        return out

    # -- feature distillation
    def cross_attention_input(self, denoiser, hidden: torch.Tensor) -> torch.Tensor:
        """attn2 reads the T5 states through the transformer's caption projection (the same in every block)."""
        return denoiser.caption_projection(hidden.to(next(denoiser.parameters()).dtype))

    def match_blocks(self, teacher, student, kept: dict | None = None) -> list[tuple[str, str]]:
        return depth_pairs(len(teacher.transformer_blocks), len(student.transformer_blocks), "transformer_blocks",
                           (kept or {}).get("transformer_blocks"))

    # -- sampling
    def draw(self, pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float,
             size: dict) -> np.ndarray:
        # no resolution binning (it resizes to the nearest trained aspect ratio and only knows 256/512/1024 px
        # models) and no caption cleaning (training encodes the captions as given)
        h, w = latents.shape[-2:]
        size = {"height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor, **size}
        return pipe(prompt=prompts, negative_prompt="", latents=latents, num_inference_steps=steps,
                    guidance_scale=guidance, eta=0.0, output_type="np", use_resolution_binning=False,
                    clean_caption=False, **size).images
