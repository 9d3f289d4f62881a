"""`channels`: structured pruning of a UNet's INNER widths through torch-pruning's dependency graph
(Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023; importance as in Diff-Pruning,
Fang et al., NeurIPS 2023).

What is pruned, in whole units so every width stays legal:
  resnet  a ResNet block's inner channels (conv1 out = norm2 = conv2 in = time_emb_proj out), in whole
          GroupNorm groups; norm2 keeps its group SIZE, so the kept groups normalise exactly as before
  heads   whole attention heads (to_q / to_k / to_v out = to_out in), so head_dim never changes
  ffn     feed-forward hidden units (GEGLU proj out, both halves = net.2 in)
ResNet and feed-forward units are also widened to `channel_multiple` channels (default 16) where the width
allows, so kept widths stay multiples of the SIMD / tensor-core width: a 24-channel conv costs as much as
a 32-channel one on an AVX-512 CPU (measured), so unaligned widths shed parameters but not latency.
Diffusion transformers go through the same dependency graph (the residual stream is never cut): PixArt's
self-attention heads and feed-forward units, SD3's and Flux's feed-forward units (image and text streams);
their joint (two-stream, QK-normed) attention and Flux's single-stream blocks (one fused output projection)
are not sites. Their saved form is the same subclass with `pruned_widths` as the UNet's (PRUNED in
safeprune.models.pruned_unet, which says why no stock transformer config can hold these widths).
Block inputs and outputs (the residual streams) are never touched, so every block's feature map keeps the
teacher's shape and feature distillation (seed eq. 4) compares like with like. The dependency graph finds
each unit's coupled layers; a group that would reach past its block is refused (torch-pruning's
MetaPruner, which also cuts the residual streams, left a tiny UNet that drew nothing, even after 300
fine-tuning steps; inner widths alone kept it drawing).

The target `ratio` is a share of the UNet's TOTAL parameters and a budget, as in eq. 2: at least that
share goes. Every prunable site loses about the same fraction of its units (Diff-Pruning's uniform
per-layer ratio; a global ranking cuts whole stages first), topped up unit by unit where the pruned share
is lowest (`allocate_units`). Within a site the units with the lowest importance go: `magnitude` = group
L_p norm of each unit's weights over all coupled layers, `taylor` = |w * dL/dw| summed likewise, with
gradients of a calibration loss (see `safeprune.pruning.prune`).
On the meta device (planning from a config) there are no weights: units are taken from the end.

The plan lists, per site, the block name, kind, unit size (channels) and the pruned unit indices
(unit u = channels u * unit ... (u + 1) * unit - 1): replaying it
through a fresh dependency graph on the base architecture rebuilds the pruned UNet exactly.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from safeprune.errors import UserError, check, choose
from safeprune.pruning.base import Method
from safeprune.pruning.measure import example_inputs, family_of

IMPORTANCES = ("magnitude", "taylor")


# ----------------------------------------------------------------------------- the three kinds of site


class Kind:
    """How one kind of site is pruned: root layer, legal unit, coupled layers, attribute re-sync."""

    name: str
    prune_out = True  # the root layer loses outputs (True) or inputs (False)
    widen = True  # units may be widened to `channel_multiple` channels

    def root(self, block) -> nn.Module: ...

    def members(self, block) -> list[nn.Module]:
        """Every layer the unit's channels may touch; the dependency graph must find no other."""

    def base_unit(self, block) -> int:
        """The smallest legal unit (one GroupNorm group, one head, one hidden unit)."""
        return 1

    def resync(self, block, base_unit: int) -> None:
        """torch-pruning reshapes the layers; attributes that cache widths (read by diffusers' forward) must follow."""

    def width(self, block) -> int:
        root = self.root(block)
        if isinstance(root, nn.Conv2d):
            return root.out_channels if self.prune_out else root.in_channels
        return root.out_features if self.prune_out else root.in_features

    def size(self, block) -> int:
        """What the saved form records for a pruned site (`PrunedUNet2DConditionModel.pruned_widths`)."""
        return self.width(block)

    def rebuild(self, block, size: int) -> None:
        """Give the block fresh layers of the recorded `size`: the architecture of a pruned model built from
        its config alone (no dependency graph, no weights; the weights load afterwards)."""

    def unit(self, block, multiple: int) -> int:
        """Channels pruned together: the base unit, widened to a multiple of `multiple` where the width allows."""
        base = self.base_unit(block)
        aligned = math.lcm(base, multiple)
        return aligned if self.widen and self.width(block) % aligned == 0 else base


class ResnetChannels(Kind):
    name = "resnet"

    def root(self, block):
        return block.conv1

    def members(self, block):
        return [block.conv1, block.norm2, block.conv2] + [m for m in [block.time_emb_proj] if m is not None]

    def base_unit(self, block):
        return block.conv1.out_channels // block.norm2.num_groups  # one GroupNorm group

    def resync(self, block, base_unit):
        block.norm2.num_groups = block.norm2.num_channels // base_unit  # same group size, fewer groups

    def rebuild(self, block, size):
        group, old = self.base_unit(block), block.conv1.out_channels
        block.conv1 = _conv(block.conv1, block.conv1.in_channels, size)
        block.norm2 = nn.GroupNorm(size // group, size, eps=block.norm2.eps, affine=block.norm2.affine)
        block.conv2 = _conv(block.conv2, size, block.conv2.out_channels)
        if block.time_emb_proj is not None:  # "scale_shift" time embeddings project to 2 x the inner width
            proj = block.time_emb_proj
            block.time_emb_proj = _linear(proj, proj.in_features, size * proj.out_features // old)


class AttentionHeads(Kind):
    name = "heads"
    widen = False  # projections are multiples of head_dim already, and attention kernels work per head

    def root(self, block):
        return block.to_q

    def members(self, block):
        return [block.to_q, block.to_k, block.to_v, block.to_out[0]]

    def base_unit(self, block):
        return block.to_q.out_features // block.heads  # head_dim

    def resync(self, block, base_unit):
        block.heads = block.sliceable_head_dim = block.to_q.out_features // base_unit
        block.inner_dim, block.inner_kv_dim = block.to_q.out_features, block.to_k.out_features

    def size(self, block):
        return block.heads  # whole heads go, so the head count says it all

    def rebuild(self, block, size):
        head_dim = self.base_unit(block)
        for name in ("to_q", "to_k", "to_v"):
            layer = getattr(block, name)
            setattr(block, name, _linear(layer, layer.in_features, size * head_dim))
        block.to_out[0] = _linear(block.to_out[0], size * head_dim, block.to_out[0].out_features)
        self.resync(block, head_dim)


class FeedForwardUnits(Kind):
    name = "ffn"
    prune_out = False  # rooted at net.2's inputs: the graph maps each hidden unit to both GEGLU halves

    def root(self, block):
        return block.net[2]

    def members(self, block):
        return [block.net[0].proj, block.net[2]]

    def rebuild(self, block, size):
        proj, out = block.net[0].proj, block.net[2]
        block.net[0].proj = _linear(proj, proj.in_features, size * proj.out_features // out.in_features)  # GEGLU: 2x
        block.net[2] = _linear(out, size, out.out_features)


def _conv(like: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """A Conv2d like `like` (kernel, stride, padding, bias, device, dtype) with other channel counts."""
    return nn.Conv2d(in_channels, out_channels, like.kernel_size, like.stride, like.padding, like.dilation,
                     like.groups, like.bias is not None, device=like.weight.device, dtype=like.weight.dtype)


def _linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, like.bias is not None, device=like.weight.device,
                     dtype=like.weight.dtype)


KINDS = {k.name: k for k in (ResnetChannels(), AttentionHeads(), FeedForwardUnits())}


def find_sites(unet) -> list[tuple[str, Kind, nn.Module]]:
    """(block name, kind, block) for every prunable site, in module order."""
    # diffusers and torch-pruning are imported where they are used: `safeprune --help` lists this package's
    # registries (cli.REGISTRY_FLAGS), which must not pay their import (seconds).
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    sites = []
    for name, block in unet.named_modules():
        if isinstance(block, ResnetBlock2D) and isinstance(block.norm2, nn.GroupNorm):
            sites.append((name, KINDS["resnet"], block))
        elif (isinstance(block, Attention) and isinstance(block.to_q, nn.Linear) and block.to_k is not None
              and getattr(block, "add_k_proj", None) is None and getattr(block, "norm_q", None) is None):
            sites.append((name, KINDS["heads"], block))  # plain (cross-)attention; joint/QK-norm variants are left alone
        elif isinstance(block, FeedForward) and hasattr(block.net[0], "proj") and isinstance(block.net[2], nn.Linear):
            sites.append((name, KINDS["ffn"], block))
    return sites


def pruned_widths(base_unet, groups: list[dict]) -> dict[str, dict[str, int]]:
    """{kind: {block: size}} of the sites a plan's `groups` prune, computed on the (full-width, possibly meta)
    base UNet: what `PrunedUNet2DConditionModel` records in its config to rebuild the pruned architecture."""
    widths: dict[str, dict[str, int]] = {}
    for entry in groups:
        kind = KINDS[entry["kind"]]
        block = base_unet.get_submodule(entry["block"])
        kept = kind.width(block) - len(entry["pruned_units"]) * entry["unit"]  # channels left at the root
        widths.setdefault(kind.name, {})[entry["block"]] = kept // kind.base_unit(block) if kind.name == "heads" \
            else kept
    return widths


@functools.lru_cache(maxsize=16)
def _widths(key: str) -> dict[str, dict[str, int]]:
    """pruned_widths of the plan groups on their full-width base config of a denoiser class, all in `key`
    (JSON), memoised: saving and loading one student asks for them several times, and each answer builds the
    base on the meta device."""
    from safeprune.pruning.measure import meta_model

    class_name, base, groups = json.loads(key)
    return pruned_widths(meta_model(base, class_name), groups)  # widths only: the full-width base on meta


def rebuild_sites(unet, widths: dict[str, dict[str, int]]) -> None:
    """Narrow every site named in `widths` ({kind: {block: size}}) to its recorded size, in place."""
    for kind_name, sites in widths.items():
        check(kind_name in KINDS, f"unknown site kind {kind_name!r} in pruned_widths; expected one of {', '.join(KINDS)}")
        kind = KINDS[kind_name]
        for name, size in sites.items():
            try:
                block = unet.get_submodule(name)
            except AttributeError as err:
                raise UserError(f"pruned_widths names {name!r}, which this UNet config lacks") from err
            check(isinstance(size, int) and 1 <= size <= kind.size(block),
                  f"pruned_widths gives {name} ({kind_name}) size {size}; the base has {kind.size(block)}")
            kind.rebuild(block, size)


# ----------------------------------------------------------------------------- dependency graph


def build_graph(unet):
    """torch-pruning's DependencyGraph of `unet`, traced with a tiny input on the UNet's own device."""
    import torch_pruning as tp

    cfg = unet.config
    if family_of(unet) == "UNet2DConditionModel":
        check(cfg.addition_embed_type is None and cfg.class_embed_type is None and cfg.num_class_embeds is None,
              "`channels` pruning supports text-conditioned SD 1.x/2.x-style UNets (no class or added embeddings); "
              "use --method blocks or magnitude for this one")
        side = 2 ** (len(cfg.down_block_types) - 1)  # smallest latent every stage can halve
    else:  # a diffusion transformer: two patches a side (Flux: one 2x2-packed token a side)
        side = 2 * cfg.get("patch_size", 1) if family_of(unet) != "FluxTransformer2DModel" else 2
    inputs = example_inputs(unet, batch=1, text_tokens=2, sample_size=side)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    was_training = unet.training
    try:
        for p in frozen:  # tracing follows autograd: frozen (teacher) weights would leave no graph
            p.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(unet, example_inputs=inputs, verbose=False,
                                                          output_transform=lambda out: out.sample)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        unet.train(was_training)
    return graph


def coupled_group(graph, name: str, kind: Kind, block, idxs: list[int]):
    """The dependency group of `idxs` at a site, refusing groups that reach past the block."""
    root = kind.root(block)
    pruner = graph.get_pruner_of_module(root)
    group = graph.get_pruning_group(root, pruner.prune_out_channels if kind.prune_out else pruner.prune_in_channels,
                                    idxs)
    allowed = {id(m) for m in kind.members(block)}
    for dep, _ in group:
        target = dep.target.module  # a layer, or one of torch-pruning's placeholder ops (no parameters)
        if isinstance(target, nn.Module) and any(True for _ in target.parameters(recurse=False)) \
                and id(target) not in allowed:
            names = {id(m): n for n, m in graph.model.named_modules()}
            raise UserError(f"cannot prune {kind.name} units of {name}: they are coupled to "
                            f"{names.get(id(target), type(target).__name__)} outside the block; this "
                            "architecture is not supported by `channels`")
    return group


def params_per_channel(group) -> float:
    """Parameters removed per root channel of a (full-width) group: exact, since pruning is linear."""
    import torch_pruning as tp

    n_root, total = len(group[0].idxs), 0
    for dep, idxs in group:
        layer = dep.target.module
        if isinstance(layer, nn.GroupNorm):
            total += len(idxs) * (2 if layer.affine else 0)
        elif isinstance(layer, (nn.Conv2d, nn.Linear)):
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                total += len(idxs) * (layer.weight[0].numel() + (layer.bias is not None))
            else:
                total += len(idxs) * layer.weight[:, 0].numel()
    return total / n_root


# ----------------------------------------------------------------------------- choosing what goes


def allocate_units(sites: list[dict], target: float, total: int) -> list[int]:
    """How many units each site loses so that at least `target` parameters go, as evenly as possible.

    First the largest uniform fraction f that stays below the target: site s loses round(f * n_s) units
    (Diff-Pruning's uniform per-layer ratio). Then single units are added where the pruned share stays
    lowest (water-filling) until the target is met, so the overshoot is at most one unit and the ratio is
    a budget, as in eq. 2: the pruned UNet keeps at most (1 - ratio) of the parameters. At least one unit
    of every site always stays.
    """
    def uniform(f: float) -> list[int]:
        return [min(math.floor(f * s["n_units"] + 0.5), s["n_units"] - 1) for s in sites]

    def removed(counts: list[int]) -> float:
        return sum(s["cost"] * s["unit"] * k for s, k in zip(sites, counts))

    most = removed([s["n_units"] - 1 for s in sites])
    check(target <= most, f"ratio {target / total:.3f} is out of reach for `channels`: pruning inner widths can "
                          f"remove at most {most / total:.1%} of this UNet's parameters; lower --ratio or use "
                          "--method blocks")
    if target <= 0:
        return [0] * len(sites)
    low, high = 0.0, 1.0  # removed(uniform(f)) is a non-decreasing step function of f: bisect below the target
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if removed(uniform(mid)) < target else (low, mid)
    counts = uniform(low)
    while removed(counts) < target:
        open_sites = [i for i, s in enumerate(sites) if counts[i] < s["n_units"] - 1]
        i = min(open_sites, key=lambda i: ((counts[i] + 1) / sites[i]["n_units"], i))
        counts[i] += 1
    return counts


def unit_scores(group, unit: int, importance: str, p: int) -> torch.Tensor:
    """(n_units,) importance of each unit: torch-pruning's per-channel group importance, summed per unit."""
    import torch_pruning as tp

    scorer = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None) if importance == "taylor" \
        else tp.importance.GroupMagnitudeImportance(p=p, group_reduction="sum", normalizer=None)
    per_channel = scorer(group).float()  # (width,)
    return per_channel.view(-1, unit).sum(1)


def accumulate_gradients(unet, calib, batches: int) -> None:
    """Gradients of the calibration loss, summed over `batches` batches (first-order Taylor importance)."""
    check(calib is not None, "importance 'taylor' needs calibration data: pass calib=(unet, i) -> loss to "
                             "safeprune.pruning.prune (the CLI builds it from the teacher's training data)")
    unet.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for i in range(batches):
            loss = calib(unet, i)
            check(loss.dim() == 0, f"calib(unet, {i}) must return a scalar loss, got shape {tuple(loss.shape)}")
            loss.backward()


# ----------------------------------------------------------------------------- the method


def apply_groups(unet, graph, groups: list[dict]) -> None:
    """Prune each planned site through the dependency graph and re-sync cached widths."""
    for entry in groups:
        kind = KINDS[entry["kind"]]
        try:
            block = unet.get_submodule(entry["block"])
        except AttributeError as err:
            raise UserError(f"plan names {entry['block']!r}, which the base UNet lacks; replay the plan on the "
                            "model it came from") from err
        base = kind.base_unit(block)  # read before pruning: the group size / head_dim to keep
        check(entry["unit"] % base == 0 and kind.width(block) % entry["unit"] == 0,
              f"plan unit {entry['unit']} at {entry['block']} does not fit the base UNet (width {kind.width(block)}, "
              f"unit {base}); replay the plan on the model it came from")
        units, n_units = entry["pruned_units"], kind.width(block) // entry["unit"]
        check(all(isinstance(u, int) and 0 <= u < n_units for u in units) and len(set(units)) < n_units,
              f"plan prunes units {units} of {entry['block']}, which has {n_units}; re-run `safeprune prune`")
        channels = [c for u in units for c in range(u * entry["unit"], (u + 1) * entry["unit"])]
        coupled_group(graph, entry["block"], kind, block, channels).prune(record_history=False)
        kind.resync(block, base)


@dataclass(frozen=True)
class Channels(Method):
    options: ClassVar[tuple[str, ...]] = ("ratio", "channels")
    report_keys: ClassVar[tuple[str, ...]] = ("ratio", "ratio_of", "importance")

    def check_config(self, cfg):
        choose("channels importance", cfg.channels.importance, dict.fromkeys(IMPORTANCES))

    def needs_calibration(self, cfg):
        return cfg.channels.importance == "taylor"  # first-order Taylor scores need gradients of a data loss

    def saved_config(self, plan):
        """The base config + `pruned_widths` ({kind: {block: size}}): the config of the denoiser's class in
        safeprune.models.pruned_unet (PrunedUNet2DConditionModel, PrunedPixArtTransformer2DModel, ...), which
        builds the pruned architecture from it directly (a stock config has one width per stage, not per layer;
        nothing is replayed at load)."""
        base = {k: v for k, v in plan["base_config"].items() if k != "pruned_widths"}
        widths = plan.get("pruned_widths")  # recorded when diffusers re-saved the folder (no plan.json)
        if widths is None:
            check(isinstance(plan.get("groups"), list), "channels plan has no 'groups'; re-run `safeprune prune`")
            key = [plan.get("model_class", "UNet2DConditionModel"), base, plan["groups"]]
            widths = copy.deepcopy(_widths(json.dumps(key, sort_keys=True)))
        return {**base, "pruned_widths": widths}

    def plan_from_config(self, config):
        """A PrunedUNet2DConditionModel config (see saved_config) is its own plan: base config + widths."""
        if "pruned_widths" not in config:
            return None
        return {"base_config": {k: v for k, v in config.items() if k != "pruned_widths"},
                "pruned_widths": config["pruned_widths"]}

    def __call__(self, unet, cfg, calib):
        on_meta = next(unet.parameters()).is_meta
        graph = build_graph(unet)
        total = sum(p.numel() for p in unet.parameters())
        sites = []
        for name, kind, block in find_sites(unet):
            width, unit = kind.width(block), kind.unit(block, cfg.channels.channel_multiple)
            if width // unit < 2:
                continue  # one group / one head: nothing can go without emptying the block
            group = coupled_group(graph, name, kind, block, list(range(width)))  # full width: for scoring
            sites.append({"name": name, "kind": kind, "unit": unit, "n_units": width // unit, "group": group,
                          "cost": params_per_channel(group)})
        check(bool(sites) or cfg.ratio == 0, "this UNet has no prunable inner widths (every block has a single "
                                             "GroupNorm group / head); use --method blocks or magnitude")
        counts = allocate_units(sites, cfg.ratio * total, total)
        if cfg.channels.importance == "taylor" and not on_meta and any(counts):
            accumulate_gradients(unet, calib, cfg.channels.calibration_batches)
        groups = []  # scored on the unpruned model, pruned afterwards
        for s, k in zip(sites, counts):
            if k == 0:
                continue
            if on_meta:  # no weights to rank: take units from the end
                order = list(range(s["n_units"] - 1, -1, -1))
            else:  # lowest importance first; ties go to the higher unit index
                scores = unit_scores(s["group"], s["unit"], cfg.channels.importance, cfg.channels.magnitude_p)
                order = sorted(range(s["n_units"]), key=lambda u: (float(scores[u]), -u))
            groups.append({"block": s["name"], "kind": s["kind"].name, "unit": s["unit"],
                           "pruned_units": sorted(order[:k])})
        unet.zero_grad(set_to_none=True)
        apply_groups(unet, graph, groups)
        importance = "positional (meta device: no weights)" if on_meta else cfg.channels.importance
        return unet, {"ratio": cfg.ratio, "ratio_of": "total parameters", "importance": importance,
                      "magnitude_p": cfg.channels.magnitude_p, "channel_multiple": cfg.channels.channel_multiple, "groups": groups}

    def replay(self, unet, plan):
        check(isinstance(plan.get("groups"), list), "channels plan has no 'groups'; re-run `safeprune prune`")
        for entry in plan["groups"]:
            check(entry.get("kind") in KINDS, f"unknown site kind {entry.get('kind')!r} in plan.json; "
                                              f"expected one of {', '.join(KINDS)}")
        if plan["groups"]:
            apply_groups(unet, build_graph(unet), plan["groups"])
        return unet
