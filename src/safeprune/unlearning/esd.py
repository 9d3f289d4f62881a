"""Erased Stable Diffusion (Gandikota et al., ICCV 2023) as the upper-level loss, the paper code's choice.

L_CU = E || eps_S(x_t, t, c) - [ eps_T(x_t, t, null) - eta (eps_T(x_t, t, c) - eps_T(x_t, t, null)) ] ||^2
(ESD's negative-guidance objective): the student is pulled toward the teacher's prediction guided AWAY from concept c.
x_t are noised latents of concept images, as in the released bilevel code (not ESD's own samples).

`esd` moves every student parameter (ESD-u-like); `esd_xattn` moves only the cross-attention layers
(ESD's "ESD-x", which its authors use for artistic styles): a prompt-specific edit with less collateral
damage to prompts that do not name the concept.

`esd_anchor` guides away from the concept relative to its ANCHOR prompt instead of the empty prompt:
  target = eps_T(x_t, t, c') - eta (eps_T(x_t, t, c) - eps_T(x_t, t, c')).
When the target prompt c names a whole scene ("a striped red circle"), eps_T(c) - eps_T(null) points away
from the object as well as the concept, so plain ESD also teaches "draw nothing here"; with the anchor
c' = "a red circle" the difference isolates the concept itself (measured on the toy world, see README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.losses.base import mse_per_sample


@dataclass(frozen=True)
class ESD:
    eta: float = 1.0  # negative-guidance strength
    params: str = "all"  # which student parameters the upper step moves: all | xattn
    reference: str = "null"  # the prompt guidance pushes away from the concept relative to: null | anchor

    @property
    def teacher_conditions(self) -> tuple[str, ...]:  # prompts the teacher is evaluated with
        return ("target", self.reference)

    def target(self, teacher_eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The negatively guided teacher prediction, (B, C, H, W)."""
        ref, cond = teacher_eps[self.reference], teacher_eps["target"]
        return ref - self.eta * (cond - ref)

    def __call__(self, student_eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_per_sample(student_eps, target.detach())  # (B,)
