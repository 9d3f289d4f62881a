"""Denoising loss L_diff (seed paper eq. 1) with the scheduler's target and optional Min-SNR-gamma weighting.

L_diff = E_t w(t) ||f_theta(x_t, t, c) - y||^2, where y is the noise eps for epsilon models (SD 1.x) and the
velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 for v-prediction models (SD 2.x). Min-SNR-gamma
(Hang et al. 2023; gamma = 5 in the paper's code) sets w(t) = min(SNR(t), gamma) / SNR(t) for epsilon, which
equalises the per-timestep loss scales. For v-prediction two forms are in use (`SNR_WEIGHTINGS`):
  diffusers  min(SNR, gamma) / (SNR + 1)      (diffusers' train_text_to_image.py)
  paper      min(SNR + 1, gamma) / (SNR + 1)  (the paper's code, rezashkv/unlearn-ft
             pdm/training/trainer.py: `snr = snr + 1` for v_prediction before `min(snr, gamma) / snr`)
Flow-matching families (SD3) regress the velocity eps - x_0 with weight 1, as diffusers' SD3 trainer does
with its logit-normal timestep density (safeprune.backbones.base).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from safeprune.backbones.base import training_schedule
from safeprune.errors import check, choose
from safeprune.losses.base import mse_per_sample

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")


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
    """Per-sample L_diff for a diffusers training scheduler: DDPM-style (with `alphas_cumprod`; eps or v target) or
    flow matching (FlowMatchEulerDiscreteScheduler; velocity target, safeprune.backbones.base)."""

    scheduler: object  # the training noise scheduler; its class and config give the prediction type
    snr_gamma: float = 5.0  # Min-SNR-gamma (eps / v only; flow matching is weighted 1); 0 disables the weighting
    snr_weighting: str = "diffusers"  # v-prediction form of the weight: diffusers | paper (SNR_WEIGHTINGS)
    timestep_density: str = "uniform"  # flow matching: how t is drawn (logit_normal | uniform)
    schedule: object = field(init=False)  # noising + target (DDPMSchedule / FlowMatchSchedule)

    def __post_init__(self):
        object.__setattr__(self, "schedule", training_schedule(self.scheduler, self.timestep_density))
        kind = self.schedule.prediction_type
        check(kind in PREDICTION_TYPES, f"scheduler prediction_type={kind!r} is not supported; "
                                        f"use one of {', '.join(PREDICTION_TYPES)}")
        choose("Min-SNR weighting", self.snr_weighting, SNR_WEIGHTINGS)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser should predict for x_t noised from latents with noise at t: eps, v or the flow
        velocity eps - x_0, (B, C, H, W)."""
        return self.schedule.target(latents, noise, timesteps)

    def __call__(self, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
        loss = mse_per_sample(pred, self.target(latents, noise, timesteps))  # (B,)
        if self.snr_gamma > 0 and self.prediction_type != "flow_matching":
            snr = self.schedule.snr(timesteps)
            loss = loss * min_snr_weight(snr, self.snr_gamma, self.prediction_type, self.snr_weighting)
        return loss
