"""`sd3`: Stable Diffusion 3 (Esser et al. 2024; StableDiffusion3Pipeline, SD3Transformer2DModel, MMDiT).

Text: CLIP-L and CLIP-G (penultimate hidden states concatenated, zero-padded to the T5 width) followed by
T5-XXL's tokens, or zeros where the pipeline has no T5 (the optional third encoder; SD3 Sec. 5.3.2);
pooled: both CLIPs' pooled outputs concatenated. Training as diffusers' train_dreambooth_sd3.py: rectified
flow, x_t = (1 - s) x_0 + s eps with s from the (shifted) FlowMatchEulerDiscreteScheduler table at a
logit-normally drawn t, target eps - x_0 (safeprune.backbones.base). Feature KD matches the image stream
after each joint transformer block (`depth_pairs`: a depth-pruned student's block with the teacher block it
was copied from, as its plan records; otherwise by relative depth). There is
no separate cross-attention: image tokens attend to the text stream's keys and values (`add_k_proj`,
`add_v_proj`), the edit set of ESD-x-style losses here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from safeprune.backbones.base import PromptEmbeddings, encode_in_chunks
from safeprune.backbones.sd import CLIP_TOKENS, SD
from safeprune.errors import check


def depth_pairs(teacher_blocks: int, student_blocks: int, prefix: str,
                kept: list[int] | None = None) -> list[tuple[str, str]]:
    """(teacher block, student block) names of one stack. With `kept` (a depth plan's record, pruning.depth.
    kept_blocks: student block i is teacher block kept[i]) student block i pairs with teacher block kept[i];
    otherwise with the teacher block at the same relative depth, round((i + 1) T / S) - 1: all blocks when
    nothing was removed, the last with the last otherwise."""
    if kept is not None and len(kept) == student_blocks and all(0 <= k < teacher_blocks for k in kept):
        return [(f"{prefix}.{k}", f"{prefix}.{i}") for i, k in enumerate(kept)]
    return [(f"{prefix}.{round((i + 1) * teacher_blocks / student_blocks) - 1}", f"{prefix}.{i}")
            for i in range(student_blocks)]


@dataclass(frozen=True)
class SD3(SD):
    name: str = "sd3"
    label: str = "an SD3-class MMDiT (SD3Transformer2DModel)"  # how messages name the family
    pipelines: tuple[str, ...] = ("StableDiffusion3Pipeline",)
    pipeline_class: str = "StableDiffusion3Pipeline"
    denoiser: str = "transformer"
    denoiser_classes: tuple[str, ...] = ("SD3Transformer2DModel", "PrunedSD3Transformer2DModel")
    cross_attention: tuple[str, ...] = (".attn.add_k_proj.", ".attn.add_v_proj.")
    output_and_time: tuple[str, ...] = ("proj_out.", "norm_out.", "time_text_embed.")
    text_stream: bool = True
    load_kwargs: dict = field(default_factory=dict)
    timestep_density: str = "logit_normal"  # train_dreambooth_sd3.py's default weighting_scheme
    max_sequence_length: int = 256  # T5 tokens (the pipeline's default)

    @property
    def text_tokens(self) -> int:
        return CLIP_TOKENS + self.max_sequence_length  # the joint sequence: CLIP-L/G's 77 tokens, then T5's

    def sequence_length(self, pipe) -> int:
        """T5 tokens, or the zero tokens that stand in for them without a T5: as many as the CLIP tokens (77; the
        toy CLIP's 24), where the stock pipeline pads 256. Zero tokens stay identical through every block (the text
        stream has no positions), so their count only weights one null key in attention; training and sampling use
        one count, and a stock pipeline draws the same images with max_sequence_length set to it."""
        if pipe.text_encoder_3 is not None:
            return self.max_sequence_length
        return pipe.tokenizer.model_max_length

    def owns_config(self, config: dict) -> bool:
        return config.get("_class_name") in self.denoiser_classes

    def training_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def check_prediction_type(self, scheduler_config, expected: str, name) -> None:
        check(not expected, f"teacher {str(name)!r} is a flow-matching {self.name} model (velocity target) but "
                            f"model.prediction_type={expected!r}; set model.prediction_type='' for this family")

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device, resolution: int = 0) -> PromptEmbeddings:
        def call(chunk):
            emb, _, pool, _ = pipe.encode_prompt(chunk, chunk, chunk, device=device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False,
                                                 max_sequence_length=self.sequence_length(pipe))
            return emb, pool

        encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        return PromptEmbeddings(*encode_in_chunks(encoders, device, prompts, call))

    def predict(self, model, x_t, timesteps, emb: PromptEmbeddings) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=emb.hidden,
                     pooled_projections=emb.pooled).sample

    def sampling_scheduler(self, scheduler, denoiser, steps: int, latent_shape: tuple[int, ...]):
        """The pipeline's FlowMatchEulerDiscreteScheduler with `steps` timesteps, as StableDiffusion3Pipeline sets
        them (a resolution-dependent shift mu where the scheduler shifts dynamically)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        tokens = latent_shape[-2] * latent_shape[-1] // denoiser.config.patch_size ** 2
        extra = {"mu": self._shift(scheduler, tokens, 1.16)} if scheduler.config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(steps, **extra)
        return scheduler

    @staticmethod
    def _shift(scheduler, tokens: int, max_shift: float) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", max_shift))

    def match_blocks(self, teacher, student, kept: dict | None = None) -> list[tuple[str, str]]:
        stack = "transformer_blocks"
        return depth_pairs(len(teacher.transformer_blocks), len(student.transformer_blocks), stack,
                           (kept or {}).get(stack))

    @staticmethod
    def feature(output) -> torch.Tensor:
        """A joint block returns (text stream, image stream): the image stream is the feature map."""
        return output[1] if isinstance(output, tuple) else output

    def use_sampler(self, pipe, name: str) -> None:
        """Flow-matching families sample with their own deterministic FlowMatchEulerDiscreteScheduler; the
        eps/v samplers of sample.scheduler do not apply."""

    def draw(self, pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float,
             size: dict) -> np.ndarray:
        return pipe(prompt=prompts, negative_prompt=[""] * len(prompts), latents=latents, num_inference_steps=steps,
                    guidance_scale=guidance, output_type="np", max_sequence_length=self.sequence_length(pipe),
                    **size).images
