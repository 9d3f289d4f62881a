"""The optimisers of `finetune.optimizer`: a registry whose keys are the config values.

Both bilevel optimisers (lower and upper) are built here, so the choice applies to both.
  adamw      torch AdamW, fused (one kernel per step; 3.5x faster than the loop on the toy UNet)
  adamw8bit  bitsandbytes' 8-bit AdamW: the two moment estimates in 8 bits with block-wise scales,
             ~2 bytes per parameter instead of 8 (Dettmers et al. 2022). An optional extra
             (`pip install safeprune[bnb]`), imported only when chosen; it needs a CUDA build of torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from safeprune.errors import UserError, choose


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _adamw8bit(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # also a broken install (e.g. no CUDA library): say what to do in one line
        raise UserError("finetune.optimizer=adamw8bit needs bitsandbytes, which is not installed here; "
                        "`pip install safeprune[bnb]` on a CUDA machine, or use finetune.optimizer=adamw") from err
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "adamw8bit": _adamw8bit}

# Persistent optimiser state in bytes per trained parameter (memory estimate): two fp32 moments, or two
# 8-bit moments plus one fp32 scale per 2048-value block (rounded up to 2).
STATE_BYTES: dict[str, int] = {"adamw": 8, "adamw8bit": 2}


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The registered optimiser `name` over `params` (an unknown name lists the valid ones)."""
    return choose("optimizer", name, OPTIMIZERS)(params, lr, weight_decay)
