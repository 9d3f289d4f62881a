"""What every pruning method knows about itself (the `PruningMethod` protocol of `safeprune.pruning`).

A method is a frozen dataclass registered in `safeprune.pruning.METHODS`; the registry key is the
`prune.method` value, the CLI choice and the file name. Besides pruning (`__call__`) and replaying a plan
(`replay`), the method answers every question the rest of the code would otherwise answer by comparing
method names: which config fields it reads, what `prune_report.json` shows of its plan, which config
a saved model carries, whether it needs calibration data, and what a loaded model needs restored.
`Method` gives the defaults of a method that keeps the architecture a stock diffusers config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

# calib(unet, i) -> scalar loss of calibration batch i (see `safeprune.pruning.prune`).
Calibration = Callable[[torch.nn.Module, int], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """Defaults; a method overrides `__call__`, `replay` and whatever else differs."""

    options: ClassVar[tuple[str, ...]] = ()  # the `prune` config fields (or sub-sections) the method reads
    report_keys: ClassVar[tuple[str, ...]] = ()  # plan fields copied into prune_report.json
    prunes: ClassVar[bool] = True  # False only for the identity: its output is the unpruned model
    # what `calib(model, i)` returns for this method: "loss" (a scalar, e.g. eq. 1 on batch i: Taylor scores)
    # or "prediction" (the model's output on batch i: `depth`'s skip error)
    calibration: ClassVar[str] = "loss"

    def __call__(self, unet, cfg, calib: Calibration | None) -> tuple[torch.nn.Module, dict]:
        """Prune `unet` (a private copy: may be changed in place); return it and the method's plan fields."""
        raise NotImplementedError

    def replay(self, unet, plan: dict) -> torch.nn.Module:
        """Apply a plan this method wrote to `unet` (a private copy built from the plan's base config)."""
        raise NotImplementedError

    def check_config(self, cfg) -> None:
        """Fail on a bad value of one of this method's options (run for every method: typos fail early)."""

    def needs_calibration(self, cfg) -> bool:
        """Whether `__call__` needs `calib` (data batches through the model) under config `cfg`."""
        return False

    def calibration_sizes(self, cfg) -> tuple[int, int]:
        """(batches, images per batch) of the calibration data `calib` draws from (default: prune.channels')."""
        return cfg.channels.calibration_batches, cfg.channels.calibration_batch_size

    def report(self, plan: dict) -> dict:
        """The method's lines of prune_report.json."""
        return {k: plan[k] for k in self.report_keys}

    def saved_config(self, plan: dict) -> dict:
        """The config.json of a saved model: the base config, which plain diffusers can load when the
        method keeps the architecture (`safeprune.models.io` explains the saved form)."""
        return plan["base_config"]

    def plan_from_config(self, config: dict) -> dict | None:
        """The plan fields a saved config.json records on its own, when the folder has no plan.json (diffusers
        re-saved it); None = this config is not one of this method's saved configs (default)."""
        return None

    def after_load(self, unet, plan: dict) -> None:
        """Restore what saved weights do not carry, after `load_unet` loaded them (default: nothing)."""
