"""Concept ablation (Kumari et al., ICCV 2023; seed paper eq. 6) as the upper-level loss.

L_CU = E || eps_T(x_t, t, c') - eps_S(x_t, t, c) ||^2: for the target prompt c the student predicts what the
teacher predicts for an anchor prompt c' ("a painting" for "a painting by Claude Monet"), so the concept is
replaced by its broader class instead of being pushed away. An empty anchor means the empty prompt.
x_t are noised images of the ANCHOR distribution (eq. 5-6: x ~ p(x | c')), so `images = "anchor"`: the recipe
feeds anchor images (safeprune.unlearning.anchors) instead of concept images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.losses.base import mse_per_sample


@dataclass(frozen=True)
class Ablation:
    params: str = "all"  # which student parameters the upper step moves: all | xattn
    teacher_conditions: tuple[str, ...] = ("anchor",)
    images: str = "anchor"  # which images the upper level noises: anchor (here) | concept (the default elsewhere)

    def target(self, teacher_eps: dict[str, torch.Tensor]) -> torch.Tensor:
        return teacher_eps["anchor"]

    def __call__(self, student_eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_per_sample(student_eps, target.detach())  # (B,)
