"""The lower level of the bilevel problem: L_ft = l_diff L_diff + l_out L_outKD + l_feat L_featKD.

Seed paper eq. 8 with the weights of the paper's code (1.0, 2.0, 0.1). Every term is returned per sample
(B,), so the training loop owns the reduction (and can log each term).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from safeprune.losses.base import mse_per_sample
from safeprune.losses.denoising import DenoisingLoss, min_snr_weight
from safeprune.losses.distill import FeatureKD, OutputKD

__all__ = ["DenoisingLoss", "FeatureKD", "LowerLevelLoss", "OutputKD", "min_snr_weight", "mse_per_sample"]


@dataclass(frozen=True, eq=False)
class LowerLevelLoss:
    """L_ft of eq. 8 as a dict of per-sample terms: diff, out_kd, feat_kd and their weighted sum `ft`."""

    denoise: DenoisingLoss
    feature_kd: FeatureKD
    lambda_diff: float = 1.0
    lambda_out: float = 2.0
    lambda_feat: float = 0.1
    output_kd: OutputKD = dataclasses.field(default_factory=OutputKD)

    @property
    def needs_features(self) -> bool:
        """Feature maps are captured only when they are weighted (hooks cost a little memory)."""
        return self.lambda_feat > 0 and bool(self.feature_kd.pairs)

    def __call__(self, student_out, teacher_out, latents, noise, timesteps,
                 student_feats=None, teacher_feats=None) -> dict[str, torch.Tensor]:
        terms = {
            "diff": self.denoise(student_out, latents, noise, timesteps),
            "out_kd": self.output_kd(student_out, teacher_out),
        }
        if self.needs_features:
            terms["feat_kd"] = self.feature_kd(student_feats, teacher_feats)
        total = self.lambda_diff * terms["diff"] + self.lambda_out * terms["out_kd"]
        if "feat_kd" in terms:
            total = total + self.lambda_feat * terms["feat_kd"]
        terms["ft"] = total
        return terms
