"""`safeprune generate` and `safeprune concept-images`: one image per (prompt, seed), independent of batching.

The sampling itself (per-image seeds, deterministic samplers, resumable folders) is safeprune.sampling, shared
with evaluation; this module holds the two commands.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from safeprune.config import Config, save_config
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import check
from safeprune.eval.prompts import read_prompt_set
from safeprune.sampling import generate_images, load_model, write_images
from safeprune.utils import atomic_folder, resolve_device

__all__ = ["generate_images", "load_model", "read_prompts", "run", "run_concept_images"]


def read_prompts(spec: str, world: ToyWorld) -> list[str]:
    """The prompts of `spec`: toy:SET (a whole toy-world set, e.g. toy:forget), a text file (one prompt per line,
    '#' = comment), an I2P CSV, COCO captions JSON or a concept YAML (safeprune.eval.prompts)."""
    if spec.startswith("toy:"):
        return [r["prompt"] for r in world.prompts(spec.removeprefix("toy:"))]
    one = Config()
    one = dataclasses.replace(one, eval=dataclasses.replace(one.eval, seeds_per_prompt=1, seeds_per_concept=1))
    return [r["prompt"] for r in read_prompt_set(spec, "prompts", one)]


# ----------------------------------------------------------------------------- CLI targets


def _draw(cfg: Config, model: str | None, pairs: list[tuple[str, int]]) -> np.ndarray:
    """Images for (prompt, seed) pairs with the model at `model` (None = the toy teacher) and cfg.sample."""
    pipe = load_model(model, resolve_device(cfg.device))
    sc = cfg.sample
    return generate_images(pipe, [p for p, _ in pairs], [s for _, s in pairs], sc.steps, sc.guidance, sc.batch_size,
                           precision=sc.precision, scheduler=sc.scheduler, resolution=sc.resolution)


def run(cfg: Config, args) -> int:
    """`safeprune generate --model PATH --prompts FILE|toy:SET --seeds N --out DIR`."""
    from safeprune.viz import make_grid, save_image

    check(args.seeds > 0, f"--seeds {args.seeds}: draw at least one image per prompt")
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    prompts = read_prompts(args.prompts, world)
    seeds = list(range(cfg.seed, cfg.seed + args.seeds))
    pairs = [(p, s) for p in prompts for s in seeds]  # prompt-major: row r of the grid is prompt r
    start = time.perf_counter()
    with atomic_folder(cfg.paths.out) as tmp:  # fails early on a non-empty --out, leaves nothing on an error
        images = _draw(cfg, cfg.paths.model or None, pairs)
        records = [{"prompt": p, "seed": s} for p, s in pairs]
        names = write_images(tmp, images)
        with open(tmp / "prompts.jsonl", "w") as f:
            f.writelines(json.dumps({**record, "file": name}) + "\n" for record, name in zip(records, names))
        # Grid: one row per prompt, one column per seed (at most 48 x 16 tiles, so it stays viewable).
        rows = [list(images[r * len(seeds):(r + 1) * len(seeds)][:16]) for r in range(min(len(prompts), 48))]
        grid = make_grid(rows, [p[:48] for p in prompts[:48]], [f"seed {s}" for s in seeds[:16]])
        save_image(grid, tmp / "grid.png")
        save_config(cfg, tmp)
    seconds = time.perf_counter() - start
    print(f"wrote {len(images)} images, prompts.jsonl and grid.png to {cfg.paths.out} in {seconds:.1f}s")
    return 0


def run_concept_images(cfg: Config, args) -> int:
    """`safeprune concept-images --prompts P... --n N --out DIR`: the upper level's concept images, drawn by the
    teacher, as a diffusers image folder (metadata.jsonl with file_name, text)."""
    check(args.n > 0, f"--n {args.n}: draw at least one image per prompt")
    prompts = [p.strip() for p in args.prompts]
    check(all(prompts), "--prompts: every prompt must be non-empty text")
    seeds = list(range(cfg.seed, cfg.seed + args.n))
    pairs = [(p, s) for p in prompts for s in seeds]
    start = time.perf_counter()
    with atomic_folder(cfg.paths.out) as tmp:
        images = _draw(cfg, cfg.paths.model or None, pairs)
        records = [{"text": p, "seed": s} for p, s in pairs]
        names = write_images(tmp, images)
        with open(tmp / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps({"file_name": name, **record}) + "\n" for record, name in zip(records, names))
        save_config(cfg, tmp)
    print(f"wrote {len(images)} concept images + metadata.jsonl to {cfg.paths.out} in {time.perf_counter() - start:.1f}s")
    return 0
