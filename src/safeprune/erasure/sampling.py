"""The erasure methods' own partial sampling runs: x_T ~ N(0, I) denoised a few guided steps by the model itself.

ESD samples x_t this way (ESD eq. 3-5: quick_sample_till_t), ConceptPrune reads FFN activations along it (the
authors' first 10 of 50 DDIM steps) and UCE reads an MMDiT's text stream along it. One loop for all three, in
the family's terms (safeprune.backbones): its sampler (DDIM with eta 0 on the DDPM schedule, the flow-matching
Euler sampler for SD3 / Flux), its guided prediction (classifier-free guidance against the empty prompt;
Flux's guidance embedding) and its latent shape. Each step is x <- step(guided(x, t_k), t_k, x).
"""

from __future__ import annotations

import torch


def erasure_latent_shape(ctx) -> tuple[int, int, int]:
    """(C, h, w) of the runs' latents: at sample.resolution (0 = the model's own size), as `generate` samples."""
    return ctx.backbone.latent_shape(ctx.pipe, ctx.cfg.sample.resolution)


def start_noise(shape: tuple[int, ...], generators, scheduler, device) -> torch.Tensor:
    """x_T (B, C, h, w) scaled by the sampler's initial sigma: one draw from one generator, or one row per
    generator in a list (so row k depends on its own seed only)."""
    if isinstance(generators, torch.Generator):
        x = torch.randn(*shape, generator=generators)
    else:
        x = torch.cat([torch.randn(1, *shape[1:], generator=g) for g in generators])
    # DDPM-family samplers may start wider than N(0, I); flow matching starts at sigma 1 (no such attribute)
    return x.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)


@torch.no_grad()
def guided_run(backbone, model, scheduler, x: torch.Tensor, emb, null, guidance: float, stop: int,
               on_step=None) -> torch.Tensor:
    """x after the first `stop` steps of `scheduler` (timesteps set) from x, guided under emb (B rows) against null
    (1 row). `on_step(k)` is called before step k's denoiser call (hooks read that call's activations)."""
    for k, t in enumerate(scheduler.timesteps[:stop]):
        if on_step is not None:
            on_step(k)
        # DDIM's input scaling is the identity; flow-matching samplers have none
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        pred = backbone.guided(model, x_in, t.to(x.device), emb, null, guidance)
        x = scheduler.step(pred, t, x).prev_sample
    return x
