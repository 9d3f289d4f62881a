"""The upper level of the bilevel problem: a registry of concept-unlearning losses L_CU.

Each entry is a small frozen dataclass with
  `teacher_conditions` — the prompts ("target", "anchor", "null") the frozen teacher is evaluated with,
  `target(teacher_eps)` — the regression target built from those teacher predictions,
  `__call__(student_eps, target)` — the per-sample loss (B,),
  `params` — which student parameters the upper step moves ("all" or "xattn", see `select_parameters`),
  `images` (optional, default "concept") — which images x_t are noised from: "concept" images, or "anchor"
  images (concept ablation, safeprune.unlearning.anchors); `finetune.upper.images` overrides it (and adds
  "student": the student's own partial samples, ESD's on-policy x_t; safeprune.bilevel.problem).
The same objects drive the bilevel solvers and the two-stage baseline. Registry keys are the values of
`finetune.unlearn.name` and the choices of `safeprune finetune --unlearn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch

from safeprune.backbones import is_cross_attention
from safeprune.config import UnlearnLossConfig
from safeprune.errors import check, choose
from safeprune.unlearning.ablation import Ablation
from safeprune.unlearning.esd import ESD


class Unlearning(Protocol):
    params: str
    teacher_conditions: tuple[str, ...]

    def target(self, teacher_eps: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def __call__(self, student_eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


UNLEARNING: dict[str, Callable[..., Unlearning]] = {
    "esd": lambda o: ESD(eta=o.eta),
    "esd_xattn": lambda o: ESD(eta=o.eta, params="xattn"),
    "esd_anchor": lambda o: ESD(eta=o.eta, reference="anchor"),
    "ablation": lambda o: Ablation(),
}

# Which parameters an upper step may move, by parameter name. "xattn" is the attention that reads the text, as
# each family names it (safeprune.backbones): `attn2` in UNets (self-attention is `attn1`), the text stream's
# key/value projections in MMDiT joint attention.
PARAMETER_SETS: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "xattn": is_cross_attention,
}


def build_unlearning(name: str, options: UnlearnLossConfig | None = None) -> Unlearning:
    """The registered unlearning loss `name`, configured by `finetune.unlearn` (defaults when None)."""
    options = options or UnlearnLossConfig(name=name)
    loss = choose("unlearning loss", name, UNLEARNING)(options)
    return dataclasses.replace(loss, params=options.params) if options.params else loss


def select_parameters(unet: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The trainable parameters of `unet` that set `which` moves (a UserError if there are none)."""
    keep = choose("parameter set", which, PARAMETER_SETS)
    params = [p for n, p in unet.named_parameters() if p.requires_grad and keep(n)]
    check(bool(params), f"the student has no parameters in set {which!r} (e.g. its cross-attention was pruned "
                        "away); choose an unlearning loss that moves all parameters, e.g. --unlearn esd")
    return params
