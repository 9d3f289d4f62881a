"""`sdxl`: Stable Diffusion XL (Podell et al. 2023; StableDiffusionXLPipeline, UNet2DConditionModel with
addition_embed_type="text_time").

Two CLIP text encoders: the UNet cross-attends to their penultimate hidden states concatenated, and adds an
embedding of the second encoder's pooled output and the micro-conditioning time ids (original size, crop
top-left, target size; SDXL Sec. 2.2) to its time embedding. Training as diffusers'
train_text_to_image_sdxl.py: the pipeline's own `encode_prompt`, time ids of an uncropped image at the
training resolution, DDPM eps/v targets. Blocks, feature KD and cross-attention (`attn2`) are as SD's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from safeprune.backbones.base import PromptEmbeddings, encode_in_chunks
from safeprune.backbones.sd import SD


@dataclass(frozen=True)
class SDXL(SD):
    name: str = "sdxl"
    label: str = "an SDXL-style UNet (addition_embed_type='text_time')"  # how messages name the family
    pipelines: tuple[str, ...] = ("StableDiffusionXLPipeline",)
    pipeline_class: str = "StableDiffusionXLPipeline"
    load_kwargs: dict = field(default_factory=lambda: {"add_watermarker": False})

    def owns_config(self, config: dict) -> bool:
        return config.get("_class_name", "UNet2DConditionModel") in self.denoiser_classes \
            and config.get("addition_embed_type") == "text_time"

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device, resolution: int = 0) -> PromptEmbeddings:
        def call(chunk):
            emb, _, pool, _ = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
            return emb, pool

        hidden, pooled = encode_in_chunks((pipe.text_encoder, pipe.text_encoder_2), device, prompts, call)
        side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return PromptEmbeddings(hidden, pooled, time_ids.to(device).expand(len(prompts), -1))

    def predict(self, model, x_t, timesteps, emb: PromptEmbeddings) -> torch.Tensor:
        return model(x_t, timesteps, encoder_hidden_states=emb.hidden,
                     added_cond_kwargs={"text_embeds": emb.pooled, "time_ids": emb.time_ids}).sample
