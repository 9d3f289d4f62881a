"""`depth`: remove whole transformer blocks, chosen by the output error when a block is skipped.

The Flux.1 Lite / TinyFusion family of depth pruning (Freepik's Flux.1 Lite 8B card: the MSE between a block's
input and output varies widely, and skipping one of the early double-stream blocks hurts while most others do
not; Fang et al., "TinyFusion: Diffusion Transformers Learned Shallow", CVPR 2025: a DiT cut from 28 to 14
layers beats width pruning at equal size), and SSD-1B / Segmind-Vega's removal of transformer layers inside
an SDXL UNet (Gupta et al., "Progressive Knowledge Distillation of Stable Diffusion XL using Layer Level
Loss", 2024).

A **stack** is a ModuleList of identical residual blocks whose length is a config entry:
  FluxTransformer2DModel    transformer_blocks (double-stream, `num_layers`), single_transformer_blocks
                            (`num_single_layers`)
  SD3Transformer2DModel     transformer_blocks (`num_layers`); the last block is text-output-free
                            (context_pre_only), so it always stays and no other block may take its place
  PixArtTransformer2DModel  transformer_blocks (`num_layers`)
  UNet2DConditionModel      every attention's transformer_blocks (`transformer_layers_per_block` for down
                            blocks and the mid block, `reverse_transformer_layers_per_block` for up blocks)

Which blocks go (first rule that applies):
  prune.depth.blocks   an explicit list of block paths, e.g. ["transformer_blocks.8", "single_transformer_blocks.3"]
  prune.depth.preset   how many blocks each stack loses (PRESETS); which ones: `select`
  prune.ratio          the blocks of lowest skip error go, globally, until at least that share of the total
                       parameters is removed (a budget, as every `ratio` in safeprune.pruning)
`select = skip_error` ranks blocks by E ||f_skip(x) - f(x)||^2 / E ||f(x)||^2: the model's prediction with
the block replaced by the identity against the full prediction, on calibration batches (one forward pass per
block and batch). `calib(model, i)` returns the model's prediction on calibration batch i: with real data,
noised latents of calibration images at keyed timesteps and their prompts encoded by the family's text
encoders; without one, random inputs of the right shapes (`safeprune.pruning.measure.model_inputs`), keyed
by ("depth-calibration", i). `select = last` removes the last blocks of each stack (Flux.1 Lite's released
layout keeps the first double-stream blocks); the meta device has no weights, so it always selects `last`.

The pruned model is a STOCK diffusers architecture: only the stack lengths in the config change, and the kept
blocks' weights are copied in order, so `FluxTransformer2DModel.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from safeprune.errors import check, choose
from safeprune.pruning.base import Method
from safeprune.pruning.measure import (
    count_parameters,
    family_of,
    model_inputs,
    run_model,
    unet_config,
)

SELECTIONS = ("skip_error", "last")

# Preset -> {family: {stack pattern: blocks kept (at most)}}. A stack pattern is a regex on the stack's path.
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    # Flux.1 Lite 8B (Freepik): 8 of the 19 double-stream blocks, all 38 single-stream blocks: 11.9 B -> 8.2 B
    "flux-lite": {"FluxTransformer2DModel": {r"transformer_blocks": 8}},
    # TinyFusion's 2x depth cut (28 -> 14 layers), on every stack of a diffusion transformer
    "half": {"FluxTransformer2DModel": {r"transformer_blocks": -2, r"single_transformer_blocks": -2},
             "SD3Transformer2DModel": {r"transformer_blocks": -2},
             "PixArtTransformer2DModel": {r"transformer_blocks": -2}},
    # SSD-1B's size (1.3 B) by SSD-1B's kind of removal: transformer layers of the 1280-channel stage (the
    # 10-layer attentions that hold 81 % of SDXL's 2.57 B parameters) cut to 4 in the down blocks, the mid
    # block and the innermost up block: 36 of SDXL's 70 transformer layers, 2.57 B -> 1.31 B
    "ssd-1b": {"UNet2DConditionModel": {r"down_blocks\.2\.attentions\.\d+": 4, r"mid_block\.attentions\.0": 4,
                                        r"up_blocks\.0\.attentions\.\d+": 4}},
    # toward Segmind-Vega's size (0.74 B) the same way: every 1280-channel attention cut to one layer (54 layers
    # removed): 2.57 B -> 0.69 B (Vega also removes ResNets, which `depth` leaves to `blocks`)
    "vega": {"UNet2DConditionModel": {r"down_blocks\.2\.attentions\.\d+": 1, r"mid_block\.attentions\.0": 1,
                                      r"up_blocks\.0\.attentions\.\d+": 1}},
}
# A negative count -n keeps len / n blocks (rounded up): "half" keeps every second one's worth.

CALIBRATION_TEXT_TOKENS = 16  # text length of the random calibration inputs (no prompts to encode)


# ----------------------------------------------------------------------------- stacks and configs


def stacks(model) -> dict[str, int]:
    """{stack path: number of blocks} of a supported denoiser, in forward order."""
    family = family_of(model)
    if family == "FluxTransformer2DModel":
        return {"transformer_blocks": len(model.transformer_blocks),
                "single_transformer_blocks": len(model.single_transformer_blocks)}
    if family in ("SD3Transformer2DModel", "PixArtTransformer2DModel"):
        return {"transformer_blocks": len(model.transformer_blocks)}
    check(family == "UNet2DConditionModel", f"`depth` pruning does not support {family}; use a diffusers UNet, "
                                            "SD3, Flux or PixArt transformer")
    found = {}
    for name, module in model.named_modules():
        if re.fullmatch(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+", name) \
                and hasattr(module, "transformer_blocks"):
            found[f"{name}.transformer_blocks"] = len(module.transformer_blocks)
    return found


def fixed_blocks(model) -> set[str]:
    """Blocks that can never go (SD3's last block: its config slot is a different, text-output-free block)."""
    if family_of(model) == "SD3Transformer2DModel":
        return {f"transformer_blocks.{len(model.transformer_blocks) - 1}"}
    return set()


def tied_stacks(model) -> list[str]:
    """UNet stacks whose lengths diffusers ties: the mid block's transformer depth is the first attention's of
    the innermost down block (both read transformer_layers_per_block[-1]). The global `ratio` search leaves
    them alone; a preset or explicit list must give them the same length."""
    if family_of(model) != "UNet2DConditionModel" or getattr(model, "mid_block", None) is None:
        return []
    last = len(model.down_blocks) - 1
    pair = [f"down_blocks.{last}.attentions.0.transformer_blocks", "mid_block.attentions.0.transformer_blocks"]
    return pair if all(p in stacks(model) for p in pair) else []


def pruned_config(model, kept: dict[str, list[int]]) -> dict:
    """The stock diffusers config of `model` with each stack holding only its `kept` (old) block indices."""
    config, family = unet_config(model), family_of(model)
    counts = {stack: len(idx) for stack, idx in kept.items()}
    if family == "FluxTransformer2DModel":
        return {**config, "num_layers": counts["transformer_blocks"],
                "num_single_layers": counts["single_transformer_blocks"]}
    if family in ("SD3Transformer2DModel", "PixArtTransformer2DModel"):
        config["num_layers"] = counts["transformer_blocks"]
        if config.get("dual_attention_layers"):  # SD3.5: the kept dual-attention blocks under their new indices
            config["dual_attention_layers"] = [j for j, old in enumerate(kept["transformer_blocks"])
                                               if old in set(config["dual_attention_layers"])]
        return config
    return _unet_config(model, config, counts)


def _unet_config(model, config: dict, counts: dict[str, int]) -> dict:
    per_down = config["transformer_layers_per_block"]
    per_down = list(per_down) if isinstance(per_down, (list, tuple)) else [per_down] * len(model.down_blocks)
    down = []
    for i, block in enumerate(model.down_blocks):
        if getattr(block, "attentions", None) is None:
            down.append(per_down[i])  # a block without attention ignores its entry
            continue
        down.append([counts[f"down_blocks.{i}.attentions.{j}.transformer_blocks"] for j in range(len(block.attentions))])
    for a, b in zip(tied_stacks(model)[:1], tied_stacks(model)[1:]):
        check(counts[a] == counts[b], f"`depth` cannot give {a} {counts[a]} blocks and {b} {counts[b]}: diffusers "
                                      "builds both from transformer_layers_per_block[-1]; remove as many from each")
    if getattr(model, "mid_block", None) is not None and "mid_block.attentions.0.transformer_blocks" in counts \
            and not tied_stacks(model) and getattr(model.down_blocks[-1], "attentions", None) is None:
        down[-1] = counts["mid_block.attentions.0.transformer_blocks"]  # the mid block reads the last entry
    reverse = config.get("reverse_transformer_layers_per_block")
    up = []
    for i, block in enumerate(model.up_blocks):
        n = len(block.resnets)
        if getattr(block, "attentions", None) is None:
            entry = reverse[i] if reverse else list(reversed(per_down))[i]
            up.append(list(entry) if isinstance(entry, (list, tuple)) else [entry] * n)
            continue
        up.append([counts[f"up_blocks.{i}.attentions.{j}.transformer_blocks"] for j in range(len(block.attentions))])
    return {**config, "transformer_layers_per_block": down, "reverse_transformer_layers_per_block": up}


# ----------------------------------------------------------------------------- the skip-error criterion


def _identity(module, args, kwargs, output):
    """Forward hook: the block returns its inputs (dual-stream blocks: (text, image) as they return them)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if isinstance(output, tuple):
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return (text, hidden)  # Flux / SD3 blocks return (encoder_hidden_states, hidden_states)
    return hidden


def random_calibration(model, batch_size: int, latent_size: int = 0):
    """calib(model, i): the prediction on random inputs of the right shapes, keyed by ("depth-calibration", i)."""
    from safeprune.utils import torch_rng

    def calib(m, i: int) -> torch.Tensor:
        inputs = model_inputs(m, batch_size, CALIBRATION_TEXT_TOKENS, latent_size or None,
                              torch_rng(0, "depth-calibration", i))
        return run_model(m, inputs)

    return calib


@torch.no_grad()
def skip_errors(model, blocks: list[str], calib, batches: int) -> dict[str, float]:
    """{block path: relative output error when that block alone is skipped}, averaged over `batches`."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    full = [calib(model, i) for i in range(batches)]
    norm = sum(float(f.float().pow(2).sum()) for f in full)
    errors = {}
    for name in tqdm(blocks, desc="skip error per block", unit="block", leave=False):
        hook = model.get_submodule(name).register_forward_hook(_identity, with_kwargs=True)
        try:
            errors[name] = sum(float((calib(model, i).float() - f.float()).pow(2).sum())
                               for i, f in enumerate(full)) / max(norm, 1e-30)
        finally:
            hook.remove()
    model.train(was_training)
    return errors


# ----------------------------------------------------------------------------- choosing what goes


def _block_params(model, name: str) -> int:
    return count_parameters(model.get_submodule(name))


def preset_counts(model, preset: str) -> dict[str, int]:
    """{stack: blocks removed} of a preset on this model."""
    family = family_of(model)
    rules = PRESETS[preset].get(family)
    check(rules is not None, f"depth preset {preset!r} is for {', '.join(PRESETS[preset])}, not {family}; presets: "
                             + ", ".join(f"{p} ({'/'.join(r)})" for p, r in PRESETS.items()))
    removed = {}
    for stack, n in stacks(model).items():
        keep = next((k for pattern, k in rules.items() if re.fullmatch(pattern + r"(\.transformer_blocks)?", stack)), None)
        if keep is not None:
            keep = -(-n // -keep) if keep < 0 else keep  # -k: keep ceil(n / k)
            removed[stack] = max(n - keep, 0)
    return removed


def choose_blocks(model, cfg, calib) -> tuple[list[str], dict[str, float] | None, str]:
    """(block paths to remove, skip errors or None, how they were selected)."""
    options, on_meta = cfg.depth, next(model.parameters()).is_meta
    sizes, fixed = stacks(model), fixed_blocks(model)
    if options.blocks:
        for name in options.blocks:
            stack, _, index = name.rpartition(".")
            check(stack in sizes and index.isdigit() and int(index) < sizes[stack],
                  f"prune.depth.blocks names {name!r}, which is not a block of this model; stacks: "
                  + ", ".join(f"{s} (0..{n - 1})" for s, n in sizes.items()))
            check(name not in fixed, f"prune.depth.blocks: {name} cannot be removed (SD3's last block has no text output)")
        return sorted(set(options.blocks), key=_order(sizes)), None, "explicit"
    select = "last" if on_meta else options.select
    calib = calib or random_calibration(model, options.calibration_batch_size, options.calibration_size)
    if options.preset:
        counts = preset_counts(model, options.preset)
        candidates = [f"{s}.{i}" for s, n in counts.items() if n for i in range(sizes[s]) if f"{s}.{i}" not in fixed]
        errors = skip_errors(model, candidates, calib, options.calibration_batches) if select == "skip_error" else None
        chosen = []
        for stack, n in counts.items():
            members = [b for b in candidates if b.rpartition(".")[0] == stack]
            if errors is None:  # the last ones
                chosen += members[len(members) - n:] if n else []
            else:  # lowest skip error first; ties go to the later block
                chosen += sorted(members, key=lambda b: (errors[b], -int(b.rpartition(".")[2])))[:n]
        return sorted(chosen, key=_order(sizes)), errors, select if errors is not None else "last"
    total = count_parameters(model)
    budget = cfg.ratio * total
    if budget <= 0:
        return [], None, select
    allowed = [s for s in sizes if s not in tied_stacks(model) and (not options.stacks or
                                                                   any(re.fullmatch(p, s) for p in options.stacks))]
    candidates = [f"{s}.{i}" for s in allowed for i in range(sizes[s]) if f"{s}.{i}" not in fixed]
    reachable = sum(_block_params(model, b) for b in candidates)
    check(reachable >= budget, f"ratio {cfg.ratio} is out of reach for `depth`: removing every removable block frees "
                               f"{reachable / total:.1%} of the parameters; lower --ratio or use a preset")
    errors = skip_errors(model, candidates, calib, options.calibration_batches) if select == "skip_error" else None
    order = sorted(candidates, key=lambda b: (errors[b], -int(b.rpartition(".")[2]))) if errors else \
        sorted(candidates, key=lambda b: -int(b.rpartition(".")[2]))  # meta: the last blocks of every stack first
    chosen, freed = [], 0
    for block in order:
        if freed >= budget:
            break
        chosen.append(block)
        freed += _block_params(model, block)
    return sorted(chosen, key=_order(sizes)), errors, select


def _order(sizes: dict[str, int]):
    ranks = {s: r for r, s in enumerate(sizes)}

    def key(block: str):
        stack, _, index = block.rpartition(".")
        return ranks[stack], int(index)

    return key


def plan_depth(model, removed: list[str]) -> tuple[dict, list[list[str]]]:
    """(pruned config, [[new prefix, old prefix], ...]) for removing `removed` block paths."""
    gone = set(removed)
    kept = {s: [i for i in range(n) if f"{s}.{i}" not in gone] for s, n in stacks(model).items()}
    if family_of(model) == "SD3Transformer2DModel":
        check(kept["transformer_blocks"] and kept["transformer_blocks"][-1] == len(model.transformer_blocks) - 1,
              "SD3's last transformer block cannot be removed (its slot is a text-output-free block)")
    config = pruned_config(model, kept)
    renames = [[f"{s}.{j}.", f"{s}.{old}."] for s, idx in kept.items() for j, old in enumerate(idx) if j != old]
    return config, renames


def kept_blocks(plan: dict, student) -> dict[str, list[int]]:
    """{stack: [the teacher block each student block is, in order]} of a depth-pruned student, from the plan's
    `weights_from` (student block j of a stack took the weights of teacher block kept[j]); {} for every other
    plan. Feature KD pairs each student block with that teacher block (TinyFusion, Flux.1 Lite: the student's
    block IS the teacher's, so its output is compared with the same block's output, not one at equal depth)."""
    if plan.get("method") != "depth":
        return {}
    sources = {new: old for new, old in plan.get("weights_from", [])}  # only blocks that moved are listed
    return {stack: [int(sources.get(f"{stack}.{j}.", f"{stack}.{j}.").rstrip(".").rpartition(".")[2])
                    for j in range(n)] for stack, n in stacks(student).items()}


@dataclass(frozen=True)
class Depth(Method):
    options: ClassVar[tuple[str, ...]] = ("ratio", "depth")
    calibration: ClassVar[str] = "prediction"
    report_keys: ClassVar[tuple[str, ...]] = ("ratio", "preset", "select", "removed")

    def check_config(self, cfg):
        options = cfg.depth
        if options.preset:
            choose("depth preset", options.preset, PRESETS)
        choose("depth selection", options.select, dict.fromkeys(SELECTIONS))
        check(not (options.blocks and options.preset), "prune.depth: pass either `blocks` (an explicit list) or "
                                                       "`preset`, not both")

    def needs_calibration(self, cfg):
        # the skip-error criterion runs the model on calibration batches; without a `calib`, random inputs
        return not cfg.depth.blocks and cfg.depth.select == "skip_error" and (bool(cfg.depth.preset) or cfg.ratio > 0)

    def calibration_sizes(self, cfg):
        return cfg.depth.calibration_batches, cfg.depth.calibration_batch_size

    def saved_config(self, plan):
        return plan["config"]  # a stock diffusers config (fewer blocks)

    def __call__(self, model, cfg, calib):
        removed, errors, select = choose_blocks(model, cfg, calib)
        config, renames = plan_depth(model, removed)
        from safeprune.pruning.blocks import build_from

        student = build_from(model, config, renames)
        by_ratio = not (cfg.depth.blocks or cfg.depth.preset)
        plan = {"ratio": cfg.ratio if by_ratio else None, "preset": cfg.depth.preset or None, "select": select, "removed": removed,
                "config": config, "weights_from": renames}
        if errors is not None:
            plan["skip_errors"] = {k: round(v, 8) for k, v in errors.items()}
        return student, plan

    def replay(self, model, plan):
        for key in ("config", "weights_from"):
            check(key in plan, f"depth plan has no {key!r}; re-run `safeprune prune --method depth`")
        from safeprune.pruning.blocks import build_from

        return build_from(model, copy.deepcopy(plan["config"]), plan["weights_from"])


