"""Erased Stable Diffusion (Gandikota et al., ICCV 2023) as the upper-level loss, the paper code's choice.

L_CU = E || eps_S(x_t, t, c) - [ eps_T(x_t, t, null) - eta (eps_T(x_t, t, c) - eps_T(x_t, t, null)) ] ||^2
(method notes, Sec. 2): the student is pulled toward the teacher's prediction guided AWAY from concept c.
x_t are noised latents of concept images, as in the released bilevel code (not ESD's own samples).

`esd` moves every student parameter (ESD-u-like); `esd_xattn` moves only the cross-attention layers
(ESD's "ESD-x", which its authors use for artistic styles): a prompt-specific edit with less collateral
damage to prompts that do not name the concept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.losses.base import mse_per_sample


@dataclass(frozen=True)
class ESD:
    eta: float = 1.0  # negative-guidance strength
    params: str = "all"  # which student parameters the upper step moves: all | xattn
    teacher_conditions: tuple[str, ...] = ("target", "null")  # prompts the teacher is evaluated with

    def target(self, teacher_eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The negatively guided teacher prediction, (B, C, H, W)."""
        null, cond = teacher_eps["null"], teacher_eps["target"]
        return null - self.eta * (cond - null)

    def __call__(self, student_eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_per_sample(student_eps, target.detach())  # (B,)
