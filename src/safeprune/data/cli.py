"""`safeprune toyworld preview|export`: look at the toy world, or write it as a diffusers image folder."""

from __future__ import annotations

import time
from pathlib import Path

from safeprune.config import save_config
from safeprune.data.toyworld import COLOURS, SHAPES, STYLES, Labels, ToyWorld, draw
from safeprune.utils import numpy_rng
from safeprune.viz import make_grid, save_image


def preview(world: ToyWorld, out: str | Path) -> Path:
    """One row per style, one column per (shape, colour); forbidden styles are marked in the label."""
    rng = numpy_rng(world.seed)
    rows, labels = [], []
    for style in STYLES:
        rows.append([draw(Labels(s, c, style), rng, world.cfg.size) for s in SHAPES for c in COLOURS])
        labels.append(style + (" (forbidden)" if style in world.forbidden["style"] else ""))
    cols = [f"{c[0]}{s[:3]}" for s in SHAPES for c in COLOURS]
    return save_image(make_grid(rows, labels, cols, scale=2), Path(out) / "preview.png")


def run_toyworld(cfg, args) -> int:
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    if args.action == "preview":
        from safeprune.runs import lock, open_run

        out = cfg.paths.out
        with lock(out, "toyworld preview"):  # a re-run replaces its own two files, never a user's
            run = open_run(out, "toyworld preview", replace_own=True).begin(claim=("preview.png", "config.yaml"))
            path = preview(world, out)
            save_config(cfg, out)
            run.save(state="finished")
        print(f"wrote {path}")
        return 0
    start = time.perf_counter()
    folder = world.export(args.folder, args.split, args.n)
    save_config(cfg, folder)
    print(f"wrote {args.n} {args.split} images + metadata.jsonl to {folder} in {time.perf_counter() - start:.1f}s")
    return 0
