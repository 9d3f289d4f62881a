"""Knowledge-distillation losses from the frozen teacher (seed paper eq. 3 and 4).

Output KD:  L_outKD  = E ||eps_T(x_t, t, c) - eps_S(x_t, t, c)||^2.
Feature KD: L_featKD = mean_i E ||F_T^i - F_S^i||^2 over the block outputs paired by
`safeprune.models.hooks.match_blocks` (the paper's code takes the mean of the per-block MSEs, 9 in SD 2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.losses.base import mse_per_sample


@dataclass(frozen=True)
class OutputKD:
    """Per-sample squared error between the student's and the teacher's predictions."""

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        return mse_per_sample(student_out, teacher_out.detach())


@dataclass(frozen=True)
class FeatureKD:
    """Per-sample mean over block pairs of the feature-map MSE."""

    pairs: tuple[tuple[str, str], ...]  # (teacher block, student block) with equal feature shapes

    def __call__(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        per_block = [mse_per_sample(student_feats[s], teacher_feats[t].detach()) for t, s in self.pairs]
        if not per_block:  # every block was removed or reshaped: the term vanishes (see match_blocks)
            any_map = next(iter(student_feats.values()))
            return any_map.new_zeros(any_map.shape[0], dtype=torch.float32)
        return torch.stack(per_block).mean(dim=0)  # (B,)
