"""The optimisers of `finetune.optimizer`: a registry whose keys are the config values.

Both bilevel optimisers (lower and upper) are built here, so the choice applies to both.
  adamw      torch AdamW, fused (one kernel per step; 3.5x faster than the loop on the toy UNet)
  adamw8bit  bitsandbytes' 8-bit AdamW: the two moment estimates in 8 bits with block-wise scales,
             ~2 bytes per parameter instead of 8 (Dettmers et al. 2022). An optional extra
             (`pip install safeprune[bnb]`), imported only when chosen; it needs a CUDA build of torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from safeprune.errors import UserError, choose


@dataclass(frozen=True)
class AdamW:
    """torch AdamW, fused."""

    state_bytes: ClassVar[int] = 8  # persistent state per trained parameter: two fp32 moments

    def __call__(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass(frozen=True)
class AdamW8bit:
    """bitsandbytes' 8-bit AdamW (an optional extra, imported only when chosen)."""

    # two 8-bit moments plus one fp32 scale per 2048-value block, rounded up to 2 bytes per parameter
    state_bytes: ClassVar[int] = 2

    def __call__(self, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # also a broken install (e.g. no CUDA library): say what to do in one line
            raise UserError("finetune.optimizer=adamw8bit needs bitsandbytes, which is not installed here; "
                            "`pip install safeprune[bnb]` on a CUDA machine, or use finetune.optimizer=adamw") from err
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


# `finetune.optimizer` values. Each entry builds the optimiser (`entry(params, lr, weight_decay)`) and says how
# many bytes of state it keeps per trained parameter (`entry.state_bytes`, for the memory estimate).
OPTIMIZERS: dict[str, AdamW | AdamW8bit] = {"adamw": AdamW(), "adamw8bit": AdamW8bit()}


def optimizer_of(name: str) -> AdamW | AdamW8bit:
    """The registered optimiser `name` (an unknown name is a one-line error listing the valid ones)."""
    return choose("optimizer", name, OPTIMIZERS)


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The registered optimiser `name` over `params`."""
    return optimizer_of(name)(params, lr, weight_decay)
