"""What `safeprune finetune --dry-run` adds below the resolved config: the launch in derived figures.

The teacher's denoiser may be a UNet or a diffusion transformer (SD3 / Flux / PixArt: `transformer/config.json`
of a pipeline; the shipped configs of well-known hub ids, KNOWN_UNETS); the estimate runs the family's call.

Global batch = per-process batch x processes x gradient accumulation (processes from WORLD_SIZE, which
`accelerate launch` / torchrun set; 1 otherwise), the step schedule of the chosen method, the teacher's
location, and the peak-memory estimate of `safeprune.memory` for the student architecture (the --student
plan, else the unpruned teacher UNet: an upper bound). Nothing is loaded but configs: UNets are built on
the meta device, so this runs in seconds at SD scale and never downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safeprune.config import Config, PruneConfig
from safeprune.errors import UserError
from safeprune.optim import optimizer_of

# Denoiser configs of well-known hub ids shipped with safeprune (assets/), so planning works before any download.
KNOWN_UNETS = {"stabilityai/stable-diffusion-2-1": "sd21", "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
               "runwayml/stable-diffusion-v1-5": "sd15", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
               "stabilityai/stable-diffusion-3-medium-diffusers": "../transformer_configs/sd3_medium",
               "black-forest-labs/FLUX.1-dev": "../transformer_configs/flux1_dev"}
UNET_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "unet_configs"
DENOISER_FOLDERS = ("unet", "transformer")  # where a diffusers pipeline keeps its denoiser


def describe_finetune(cfg: Config, args) -> str:
    from safeprune.bilevel import build_method

    ft = cfg.finetune
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    method = build_method(ft)
    teacher = cfg.model.teacher
    hint = "   (processes from WORLD_SIZE; the presets assume 4: accelerate launch --num_processes 4)"
    lines = ["# derived (dry run)",
             (f"global batch = {ft.batch_size} per process x {processes} processes x {ft.grad_accum} accumulation "
              f"= {ft.batch_size * processes * ft.grad_accum}{hint if processes == 1 else ''}"),
             (f"schedule: {method.total_steps} iterations, {method.upper_steps} upper steps "
              f"({type(method).__name__}, K={ft.upper.every}); lower lr {ft.lr:g} after {ft.warmup_steps} warm-up "
              f"steps, upper lr {ft.upper.lr:g}; {ft.upper.batch_size * processes * ft.upper.grad_accum} concept "
              f"images per upper step ({ft.upper.batch_size} x {processes} x {ft.upper.grad_accum} accumulation)"),
             f"optimizer: {ft.optimizer}, {optimizer_of(ft.optimizer).state_bytes} bytes of state per trained "
             "parameter (lower and upper level)",
             f"images seen: {method.total_steps * ft.batch_size * processes * ft.grad_accum:,} (lower level)",
             f"concepts: {len(ft.concepts)} ({'; '.join(f'{c.target!r} -> {c.anchor!r}' for c in ft.concepts)})"
             if ft.concepts else "concepts: none set (derived from the concept images' captions)",
             f"teacher: {_where(teacher)}"]
    try:
        lines.append(_memory_line(cfg, teacher, cfg.paths.student or None, processes))
    except (UserError, OSError, ValueError, KeyError) as err:
        lines.append(f"estimated peak memory: unavailable ({str(err).splitlines()[0][:160]})")
    return "\n".join(lines)


def _where(teacher: str) -> str:
    from safeprune.models.io import is_hub_id

    if not teacher:
        return "the shipped toy teacher"
    if not is_hub_id(teacher):
        return f"{teacher} (local folder{'' if (Path(teacher) / 'model_index.json').is_file() else ', NOT FOUND'})"
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(teacher, "model_index.json"), str)
    return f"{teacher} (hub id; {'in the local HF cache' if cached else 'NOT in the local HF cache: hf download ' + teacher})"


def _teacher_unet_config(teacher: str) -> dict:
    """The teacher's UNet config.json: local folder, HF cache, or a shipped copy for a well-known hub id."""
    from safeprune.models.io import is_hub_id
    from safeprune.models.shipped import teacher_path

    if not teacher:
        return json.loads((teacher_path() / "unet" / "config.json").read_text())
    if not is_hub_id(teacher):
        found = [Path(teacher) / d / "config.json" for d in DENOISER_FOLDERS if (Path(teacher) / d / "config.json").is_file()]
        return json.loads((found[0] if found else Path(teacher) / "unet" / "config.json").read_text())
    from huggingface_hub import try_to_load_from_cache

    for folder in DENOISER_FOLDERS:
        cached = try_to_load_from_cache(teacher, f"{folder}/config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    if teacher in KNOWN_UNETS:
        return json.loads((UNET_CONFIGS / f"{KNOWN_UNETS[teacher]}.json").read_text())
    raise UserError(f"the UNet config of {teacher} is not available offline")


def _memory_line(cfg: Config, teacher: str, student: str | None, processes: int) -> str:
    from safeprune.memory import estimate_memory, meta_unet

    teacher_unet = meta_unet(_teacher_unet_config(teacher))
    if student:
        from safeprune.models.io import build_unet, load_plan

        student_unet, which = build_unet(load_plan(student), student), "the --student plan"  # meta device
    elif cfg.prune.method != PruneConfig().method:
        # the preset names its own pruning (sdxl / sd3 / flux: `depth`): plan it on the meta teacher
        from safeprune.pruning import prune

        student_unet = prune(teacher_unet, cfg.prune.method, cfg.prune)[0]
        which = f"the preset's prune section planned on meta ({cfg.prune.method}"
        which += f", {cfg.prune.depth.preset})" if cfg.prune.depth.preset else ")"
    else:
        student_unet, which = teacher_unet, "the unpruned teacher UNet (pass --student for the pruned one)"
    vae_scale = 8 if teacher else 2  # SD's VAE downsamples 8x; the toy VAE 2x
    latent = (cfg.finetune.resolution // vae_scale) if cfg.finetune.resolution else teacher_unet.config.sample_size
    from safeprune.pruning.measure import default_text_tokens
    from safeprune.recipes.finetune import resolve_mixed_precision

    tokens = default_text_tokens(teacher_unet)  # SD: 77 CLIP tokens; SD3 333, Flux 512 (their pipelines' defaults)
    est = estimate_memory(resolve_mixed_precision(cfg), student_unet, teacher_unet, latent_size=latent,
                          processes=processes, text_tokens=tokens)
    return f"{est.summary()}\n  (student = {which}; {latent}x{latent} latents, {tokens} text tokens)"
