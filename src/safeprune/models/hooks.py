"""Block-output feature maps of a diffusers UNet, for feature distillation (seed paper eq. 4).

L_featKD compares teacher and student feature maps F^i at the output of every down block, the mid block
and every up block (9 maps in SD 2.1). They are captured with forward hooks inside a context manager
that always removes its hooks, so a crashed step never leaves a hook behind that keeps tensors alive.

BK-SDM-style block removal (`blocks` pruning, presets `small`/`tiny`) drops the mid block and/or the
innermost stage; `match_blocks` pairs what survives by position from the image side (down blocks from
the input, up blocks from the output), so a missing block is left out instead of shifting every pair.
After `tiny` the student's last down block has no downsampler while the teacher's block at that depth has
one, so their outputs differ in resolution; as BK-SDM's feature KD does (Nota-NetsPresso/BK-SDM
src/kd_train_text_to_image.py: teacher `down_blocks.2.attentions.1.proj_out` with student
`down_blocks.2.attentions.0.proj_out`), that pair compares the last sub-block before the downsampler instead.

Block names are those of the plain UNet. Distributed wrappers insert path segments (DDP `module.`, FSDP
`_fsdp_wrapped_module.`, activation checkpointing `_checkpoint_wrapped_module.`, torch.compile `_orig_mod.`);
`capture_features` strips them, so the same names work on a plain, a DDP- or an FSDP-wrapped UNet.
`match_features` checks a student against its teacher with one dry forward pass and keeps the block pairs
whose feature maps have the same shape.
"""

from __future__ import annotations

import contextlib
import re

import torch

from safeprune.errors import UserError, check

# Path segments that wrappers insert between a module and its children (never a diffusers module name).
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def canonical_name(name: str) -> str:
    """A module or parameter name without wrapper segments: DDP's leading `module.`, FSDP's, checkpointing's."""
    parts = name.split(".") if name else []
    while parts and parts[0] == "module":  # DDP (also DDP around a compiled module)
        parts.pop(0)
    return ".".join(p for p in parts if p not in WRAPPER_SEGMENTS)


def named_blocks(unet) -> dict[str, torch.nn.Module]:
    """{canonical name: module}; where a wrapper and the module it wraps share a name, the outer one (its
    output is the block's output, and it is what the parent calls)."""
    modules: dict[str, torch.nn.Module] = {}
    for name, module in unet.named_modules():
        modules.setdefault(canonical_name(name), module)
    return modules


def feature_blocks(unet) -> list[str]:
    """Names of the block outputs used for feature distillation, in forward order."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def match_blocks(teacher, student) -> list[tuple[str, str]]:
    """(teacher block, student block) pairs that exist in both UNets.

    Down block i of both sits i stages below the input; up block j sits (len - 1 - j) stages below the
    output. Pairing by that depth keeps e.g. the highest-resolution up block matched when `tiny` pruning
    removed the innermost stage (whose up block is `up_blocks.0` in diffusers' numbering).
    """
    pairs = []
    n_down = min(len(teacher.down_blocks), len(student.down_blocks))
    for i in range(n_down):
        t_block, s_block = teacher.down_blocks[i], student.down_blocks[i]
        if t_block.downsamplers is not None and s_block.downsamplers is None:  # `tiny`: the student's last stage
            pairs.append((f"down_blocks.{i}.{_before_downsampler(t_block)}",
                          f"down_blocks.{i}.{_before_downsampler(s_block)}"))
        else:
            pairs.append((f"down_blocks.{i}", f"down_blocks.{i}"))
    if getattr(teacher, "mid_block", None) is not None and getattr(student, "mid_block", None) is not None:
        pairs.append(("mid_block", "mid_block"))
    t_up, s_up = len(teacher.up_blocks), len(student.up_blocks)
    for depth in reversed(range(min(t_up, s_up))):  # depth 0 = the block next to the output
        pairs.append((f"up_blocks.{t_up - 1 - depth}", f"up_blocks.{s_up - 1 - depth}"))
    return pairs


def _before_downsampler(block) -> str:
    """The down block's last sub-module before its downsampler: the last attention's `proj_out` (BK-SDM's
    choice), else the last ResNet."""
    attentions = getattr(block, "attentions", None)
    if attentions:
        return f"attentions.{len(attentions) - 1}.proj_out"
    return f"resnets.{len(block.resnets) - 1}"


def first_output(output) -> torch.Tensor:
    """A UNet block's feature map: down blocks return (hidden_states, skip connections)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_features(unet, names: list[str] | tuple[str, ...], feature=first_output):
    """Yield a dict that the next forward pass of `unet` fills with {block name: feature(output)}.

    `feature` picks the feature map from a block's output (the family's: safeprune.backbones; for UNets the
    hidden states of a down block's (hidden_states, skips)). The hooks are removed on exit, also when the
    forward pass raises.
    """
    features: dict[str, torch.Tensor] = {}
    modules = named_blocks(unet)
    missing = [n for n in names if n not in modules]
    if missing:
        blocks = [n for n in modules if re.fullmatch(r"(down|up)_blocks\.\d+|mid_block|\w*transformer_blocks\.\d+", n)]
        raise KeyError(f"the UNet has no block(s) {missing}; available: {blocks}")

    def hook_for(name):
        def hook(_module, _inputs, output):
            features[name] = feature(output)

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def match_features(teacher, student, null_embedding, backbone=None,
                   latent_shape: tuple[int, ...] | None = None, kept: dict | None = None) -> list[tuple[str, str]]:
    """Check that student and teacher fit (same inputs, same output shape) and pair their feature maps.

    One dry forward pass on a (1, C, h, w) input (`latent_shape`, default the teacher's sample size): a student
    that cannot take the teacher's latents or text embeddings is a user error; block pairs whose shapes differ
    (e.g. a pruned block width) are dropped. `backbone` (safeprune.backbones; None = SD 1.x/2.x) calls the
    denoiser and names its blocks; `kept` is a depth-pruned student's record of which teacher block each of its
    blocks is (safeprune.pruning.depth.kept_blocks), so transformer blocks pair with their own originals.
    """
    from safeprune.backbones import BACKBONES

    backbone = backbone or BACKBONES["sd"]
    cfg = teacher.config
    if latent_shape is None:
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        latent_shape = (cfg.in_channels, *size)
    x = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])  # any valid timestep: only shapes are compared
    emb = null_embedding[None]
    pairs = backbone.match_blocks(teacher, student, kept)
    device, dtype = next(teacher.parameters()).device, next(teacher.parameters()).dtype
    with capture_features(teacher, [p[0] for p in pairs], backbone.feature) as t_feats:
        t_out = backbone.predict(teacher, x.to(device, dtype), t.to(device), emb.to(device, dtype))
    s_device = next(student.parameters()).device
    try:
        with capture_features(student, [p[1] for p in pairs], backbone.feature) as s_feats:
            s_out = backbone.predict(student, x.to(s_device), t.to(s_device), emb.to(s_device))
    except (RuntimeError, ValueError, AttributeError) as err:
        raise UserError(f"student and teacher do not match (the student cannot take the teacher's latents and text "
                        f"embeddings: {str(err).splitlines()[0][:160]}); prune the student from this teacher") from err
    check(s_out.shape == t_out.shape, f"student and teacher do not match: the student predicts {tuple(s_out.shape)} "
                                      f"but the teacher {tuple(t_out.shape)}; prune the student from this teacher")
    return [(tn, sn) for tn, sn in pairs if t_feats[tn].shape == s_feats[sn].shape]
