"""Denoising loss L_diff (seed paper eq. 1) with the scheduler's target and optional Min-SNR-gamma weighting.

L_diff = E_t w(t) ||f_theta(x_t, t, c) - y||^2, where y is the noise eps for epsilon models (SD 1.x) and the
velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 for v-prediction models (SD 2.x). Min-SNR-gamma
(Hang et al. 2023; gamma = 5 in the paper's code) sets w(t) = min(SNR(t), gamma) / SNR(t) for epsilon, which
equalises the per-timestep loss scales. For v-prediction two forms are in use (`SNR_WEIGHTINGS`):
  diffusers  min(SNR, gamma) / (SNR + 1)      (diffusers' train_text_to_image.py)
  paper      min(SNR + 1, gamma) / (SNR + 1)  (the paper's code, rezashkv/unlearn-ft
             pdm/training/trainer.py: `snr = snr + 1` for v_prediction before `min(snr, gamma) / snr`)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.errors import check, choose
from safeprune.losses.base import mse_per_sample

PREDICTION_TYPES = ("epsilon", "v_prediction")


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for x_t = scheduler.add_noise(latents, noise, t): eps, or v for
    `v_prediction` schedulers (the velocity of eq. 1's v-form), (B, C, H, W)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


# finetune.snr_weighting -> the Min-SNR weight of a v-prediction model, (SNR (B,), gamma) -> (B,)
SNR_WEIGHTINGS = {
    "diffusers": lambda snr, gamma: torch.clamp(snr, max=gamma) / (snr + 1.0),
    "paper": lambda snr, gamma: torch.clamp(snr + 1.0, max=gamma) / (snr + 1.0),
}


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str, weighting: str = "diffusers") -> torch.Tensor:
    """Per-sample Min-SNR-gamma weight (B,) for the given SNR(t) values (B,); `weighting` matters for v only."""
    if prediction_type == "v_prediction":
        return choose("Min-SNR weighting", weighting, SNR_WEIGHTINGS)(snr, gamma)
    return torch.clamp(snr, max=gamma) / snr


@dataclass(frozen=True, eq=False)
class DenoisingLoss:
    """Per-sample L_diff for a diffusers noise scheduler (DDPM-style, with `alphas_cumprod`)."""

    scheduler: object  # the training noise scheduler; its config gives the prediction type
    snr_gamma: float = 5.0  # Min-SNR-gamma; 0 disables the weighting
    snr_weighting: str = "diffusers"  # v-prediction form of the weight: diffusers | paper (SNR_WEIGHTINGS)

    def __post_init__(self):
        kind = self.scheduler.config.prediction_type
        check(kind in PREDICTION_TYPES, f"scheduler prediction_type={kind!r} is not supported; "
                                        f"use one of {', '.join(PREDICTION_TYPES)}")
        choose("Min-SNR weighting", self.snr_weighting, SNR_WEIGHTINGS)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict for x_t = add_noise(latents, noise, t): eps or v, (B, C, H, W)."""
        return denoising_target(self.scheduler, latents, noise, timesteps)

    def __call__(self, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
        loss = mse_per_sample(pred, self.target(latents, noise, timesteps))  # (B,)
        if self.snr_gamma > 0:
            # imported here: safeprune.unlearning, a registry that `safeprune --help` lists, imports this package
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, timesteps)
            loss = loss * min_snr_weight(snr, self.snr_gamma, self.prediction_type, self.snr_weighting)
        return loss
