"""Pruning methods for diffusers UNets: one registry, one replayable JSON plan per pruned model.

The seed paper's method is "a plug-in after ANY pruning method" (Sec. 4): its eq. 2 asks for a
parameter set theta_pruned with ||theta_pruned||_0 <= R that keeps the loss close to the teacher's. The
families behind that constraint, each one file:

  blocks     BK-SDM block removal (presets base / small / tiny); stays a stock diffusers architecture
  channels   structured pruning of inner widths through torch-pruning's dependency graph
  depth      whole transformer blocks (Flux / SD3 / PixArt) or a UNet's transformer layers (SDXL: SSD-1B), chosen
             by the output error when each is skipped; stays a stock diffusers architecture
  magnitude  unstructured global magnitude pruning to an L0 budget; masks persist through fine-tuning
  none       identity: the "fine-tune the unpruned model" control

`prune` returns the pruned UNet and a JSON-serialisable **plan**; `apply_plan(base, plan)` replays the plan
on any UNet built from the same base config (real weights, or the meta device to rebuild only the
architecture before loading saved weights). `ratio` is always a share of the UNet's TOTAL parameters.

Every plan: {"format": 1, "method": name, "base_config": {...}, ...method fields}. Each method (a frozen
dataclass, `safeprune.pruning.base.Method`) also says which config fields it reads, what the report shows,
which config.json a saved model carries and what loading must restore, so no caller compares method names.

Fine-tuning loops call `reapply_masks(unet)` after every optimizer step: it keeps magnitude-pruned weights
exactly zero and is a no-op for every other model.
"""

from __future__ import annotations

import copy
import json
from typing import Protocol

import torch

from safeprune.config import PruneConfig
from safeprune.errors import check, choose
from safeprune.pruning.base import Calibration
from safeprune.pruning.blocks import PRESETS, Blocks
from safeprune.pruning.channels import IMPORTANCES, Channels
from safeprune.pruning.depth import Depth
from safeprune.pruning.magnitude import Magnitude, reapply_masks, restore_masked_layers, sparsity_masks
from safeprune.pruning.measure import family_of, unet_config
from safeprune.pruning.none import Identity

PLAN_FORMAT = 1


class PruningMethod(Protocol):
    """See `safeprune.pruning.base.Method` for the defaults and what each member means."""

    options: tuple[str, ...]
    report_keys: tuple[str, ...]
    prunes: bool
    calibration: str

    def __call__(self, unet, cfg: PruneConfig, calib: Calibration | None) -> tuple[torch.nn.Module, dict]: ...

    def replay(self, unet, plan: dict) -> torch.nn.Module: ...

    def check_config(self, cfg: PruneConfig) -> None: ...

    def needs_calibration(self, cfg: PruneConfig) -> bool: ...

    def calibration_sizes(self, cfg: PruneConfig) -> tuple[int, int]: ...

    def report(self, plan: dict) -> dict: ...

    def saved_config(self, plan: dict) -> dict: ...

    def plan_from_config(self, config: dict) -> dict | None: ...

    def after_load(self, unet, plan: dict) -> None: ...


METHODS: dict[str, PruningMethod] = {
    "blocks": Blocks(),
    "channels": Channels(),
    "depth": Depth(),
    "magnitude": Magnitude(),
    "none": Identity(),
}


def method_of(plan: dict) -> PruningMethod:
    """The registered method that wrote `plan` (a one-line error naming the valid ones otherwise)."""
    return choose("pruning method in plan.json", plan.get("method"), METHODS)


def prune(unet, method: str, cfg: PruneConfig, calib: Calibration | None = None) -> tuple[torch.nn.Module, dict]:
    """Prune a copy of `unet` with registry method `method`; the input UNet is never modified.

    `cfg` supplies the method's options (`METHODS[method].options`). `calib` is only needed where
    `METHODS[method].needs_calibration(cfg)` (`channels` with `importance: taylor`): a callable
    `calib(unet, i) -> loss` that runs `unet` on calibration batch i (i = 0 .. cfg.channels.calibration_batches - 1;
    the batch must depend only on i, e.g. noised latents of the teacher's training images with their
    captions) and returns a scalar loss, e.g. the denoising loss of eq. 1. Gradients of that loss,
    accumulated over the batches, give the first-order Taylor importance |w * dL/dw| (as Diff-Pruning).

    Returns (pruned UNet, plan); the plan is JSON-serialisable and replays with `apply_plan`.
    """
    pruner = choose("pruning method", method, METHODS)
    for each in METHODS.values():  # typos in another method's options fail too, not only when it runs
        each.check_config(cfg)
    base_config = unet_config(unet)
    pruned, fields = pruner(copy.deepcopy(unet), cfg, calib)
    plan = {"format": PLAN_FORMAT, "method": method, "base_config": base_config, **fields}
    if family_of(unet) != "UNet2DConditionModel":  # a diffusion transformer: which diffusers class to build
        plan["model_class"] = family_of(unet)
    json.dumps(plan)  # fail here, not when saving, if a method put something non-JSON into its plan
    return pruned, plan


def apply_plan(base_unet, plan: dict) -> torch.nn.Module:
    """Replay `plan` on a copy of `base_unet` (same base config as the plan's); the input is not modified."""
    check(isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT,
          f"unsupported pruning plan (format {plan.get('format') if isinstance(plan, dict) else plan!r}); "
          f"this safeprune reads format {PLAN_FORMAT}: re-run `safeprune prune`")
    pruner = method_of(plan)
    expected, live = plan.get("base_config") or {}, unet_config(base_unet)
    # Compare shared keys only: a newer diffusers may add config keys (with defaults) that an older plan lacks.
    differing = sorted(k for k in expected if k in live and _comparable(expected[k]) != _comparable(live[k]))
    check(not differing, f"the pruning plan was made for another base UNet (config differs in {differing[:4]}); "
                         "replay it on the model it came from")
    return pruner.replay(copy.deepcopy(base_unet), plan)


def identity_plan(base_config: dict | None = None) -> dict:
    """The plan of an unpruned UNet (a plain diffusers folder, or `none`)."""
    plan = {"format": PLAN_FORMAT, "method": "none"}
    return plan if base_config is None else {**plan, "base_config": base_config}


def plan_from_config(config: dict) -> dict:
    """The plan of a saved UNet folder without plan.json, from its config.json alone: the method whose saved
    config it is (a channels folder that diffusers re-saved), else the identity (a plain diffusers UNet)."""
    for name, method in METHODS.items():
        fields = method.plan_from_config(config)
        if fields is not None:
            return {"format": PLAN_FORMAT, "method": name, **fields}
    return identity_plan(config)


def is_pruned(plan: dict) -> bool:
    """Whether the plan's model differs from its base model (False for the identity)."""
    return method_of(plan).prunes


def saved_config(plan: dict) -> dict:
    """The config.json a saved model of `plan` carries (see `safeprune.models.io`)."""
    return method_of(plan).saved_config(plan)


def after_load(unet, plan: dict) -> None:
    """After loading saved weights into the replayed architecture: what the method must restore (masks), and
    the masks an erasure method left (`masked_layers`, e.g. ConceptPrune's zeros)."""
    method_of(plan).after_load(unet, plan)
    restore_masked_layers(unet, plan)


def _comparable(value):
    """Config values as JSON sees them (tuples -> lists), so a config read from disk equals the live one."""
    return json.loads(json.dumps(value))


__all__ = ["IMPORTANCES", "METHODS", "PLAN_FORMAT", "PRESETS", "after_load", "apply_plan", "identity_plan",
           "is_pruned", "method_of", "plan_from_config", "prune", "reapply_masks", "saved_config", "sparsity_masks"]
