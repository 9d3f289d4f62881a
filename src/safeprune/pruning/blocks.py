"""`blocks`: BK-SDM block removal (Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable
Diffusion", ECCV 2024, Sec. 3.1), generalised from SD 1.x to any UNet2DConditionModel config.

Presets (each contains the previous one):
  base   one ResNet(+attention) pair fewer per stage: the last pair of every down stage and the
         second-to-last of every up stage (BK-SDM keeps up pairs 1 and 3 of 3), i.e. layers_per_block - 1
  small  base + the mid block removed
  tiny   small + the innermost stage removed (its down block and the first up block)

Every result is a stock diffusers architecture (a config change), so the pruned UNet saves and loads with
plain `save_pretrained` / `from_pretrained`. Weights are copied from the kept blocks by name; the plan
stores the pruned config and the renamed prefixes ("weights_from"), so replay needs no preset logic.
On the SD 1.x config this gives BK-SDM's released sizes: 579.4 M / 482.3 M / 323.4 M parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from safeprune.errors import UserError, check, choose
from safeprune.pruning.base import Method
from safeprune.pruning.measure import unet_config

PRESETS = ("base", "small", "tiny")

# Config entries that may hold one value per stage (in down-block order); `tiny` drops the innermost one.
PER_STAGE_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention",
                  "layers_per_block", "transformer_layers_per_block")


def plan_blocks(config: dict, preset: str) -> tuple[dict, list[list[str]]]:
    """(pruned config, [[new prefix, old prefix], ...]) for a BK-SDM preset on a base UNet config."""
    check(preset in PRESETS, f"unknown blocks preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(config)
    stages = len(cfg["down_block_types"])
    per_stage = cfg["layers_per_block"]
    layers = list(per_stage) if isinstance(per_stage, (list, tuple)) else [per_stage] * stages
    check(min(layers) >= 2, f"blocks preset {preset!r} does not fit this UNet: it removes one ResNet+attention "
                            f"pair per stage but layers_per_block={per_stage} (needs >= 2); try --method channels")
    cfg["layers_per_block"] = [n - 1 for n in layers] if isinstance(per_stage, (list, tuple)) else per_stage - 1

    if preset in ("small", "tiny"):
        check(cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None,
              f"blocks preset {preset!r} does not fit this UNet: it has no mid block to remove; use preset base")
        cfg["mid_block_type"] = None

    shift = 0  # new up block j is old up block j + shift (diffusers numbers up blocks from the innermost stage)
    if preset == "tiny":
        check(stages >= 2, f"blocks preset 'tiny' does not fit this UNet: it removes the innermost stage but the "
                           f"UNet has only {stages}; use preset small")
        cfg["down_block_types"] = list(cfg["down_block_types"])[:-1]
        cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
        cfg["block_out_channels"] = list(cfg["block_out_channels"])[:-1]
        for key in PER_STAGE_KEYS:
            if isinstance(cfg.get(key), (list, tuple)):
                cfg[key] = list(cfg[key])[:-1]
        if isinstance(cfg.get("reverse_transformer_layers_per_block"), (list, tuple)):  # up-block order
            cfg["reverse_transformer_layers_per_block"] = list(cfg["reverse_transformer_layers_per_block"])[1:]
        shift = 1

    # Down stages keep their first pairs under the same names. Old up block u (mirror of down stage
    # stages - 1 - u) has layers + 1 pairs and loses the one at index layers - 1, so later pairs move
    # down by one: BK-SDM's `up_blocks.i.resnets.1 <- up_blocks.i.resnets.2`.
    renames = []
    for j in range(stages - shift):
        u = j + shift
        removed = layers[stages - 1 - u] - 1
        for k in range(layers[stages - 1 - u]):  # pairs of the new up block
            for part in ("resnets", "attentions"):
                renames.append((f"up_blocks.{j}.{part}.{k}.", f"up_blocks.{u}.{part}.{k if k < removed else k + 1}."))
        renames.append((f"up_blocks.{j}.upsamplers.", f"up_blocks.{u}.upsamplers."))
    return cfg, [[new, old] for new, old in renames if new != old]


def build_from(base_unet, config: dict, renames) -> object:
    """A model of `base_unet`'s class (UNet or diffusion transformer) with `config` whose weights are copies of
    `base_unet`'s kept blocks (meta stays meta). Also `depth`'s builder."""
    # Imported here, not at the top: `safeprune --help` lists this package's registry (cli.REGISTRY_FLAGS),
    # which must not pay diffusers' import (seconds).
    from accelerate import init_empty_weights

    from safeprune.pruning.measure import denoiser_class, family_of

    renames = [tuple(r) for r in renames]
    old = base_unet.state_dict()
    # buffers that are not in the state dict (PixArt's sin-cos position table) are computed at init: on the meta
    # device for a meta base (its inputs are meta), as real tensors otherwise
    with init_empty_weights(include_buffers=next(base_unet.parameters()).is_meta):
        student = denoiser_class(family_of(base_unet)).from_config(config)
    weights = {}
    for key, slot in student.state_dict().items():
        source = next((old_p + key[len(new_p):] for new_p, old_p in renames if key.startswith(new_p)), key)
        if source not in old or old[source].shape != slot.shape:
            found = f"shape {tuple(old[source].shape)}" if source in old else "nothing"
            raise UserError(f"this plan does not fit the model: {key} {tuple(slot.shape)} would take {source} "
                            f"({found}); pick another preset or method")
        weights[key] = old[source].clone()  # the student must never share storage with the teacher
    student.load_state_dict(weights, strict=True, assign=True)
    return student


@dataclass(frozen=True)
class Blocks(Method):
    options: ClassVar[tuple[str, ...]] = ("blocks",)
    report_keys: ClassVar[tuple[str, ...]] = ("preset",)

    def check_config(self, cfg):
        choose("blocks preset", cfg.blocks.preset, dict.fromkeys(PRESETS))

    def saved_config(self, plan):
        return plan["config"]  # the pruned architecture is itself a stock diffusers config

    def __call__(self, unet, cfg, calib):
        config, renames = plan_blocks(unet_config(unet), cfg.blocks.preset)
        student = build_from(unet, config, renames)
        return student, {"preset": cfg.blocks.preset, "config": config, "weights_from": [list(r) for r in renames]}

    def replay(self, unet, plan):
        for key in ("config", "weights_from"):
            check(key in plan, f"blocks plan has no {key!r}; re-run `safeprune prune --method blocks`")
        return build_from(unet, plan["config"], plan["weights_from"])
