"""Toy-world rendering rate on one CPU thread (images/s), against the floor of 2,000 images/s.

The judge and the teacher stream their training data from the renderer instead of storing it, so the
renderer must stay far faster than the models that consume it. Writes a JSON line (and --out FILE).
Usage: .venv/bin/python benchmarks/bench_toyworld.py [--n 4000] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from safeprune.data.toyworld import ToyWorld

FLOOR = 2000.0  # images/s on one core


def measure(n: int, split: str, repeats: int = 3) -> float:
    """Best-of-`repeats` rate for rendering n images of `split` (best-of damps noise from other processes)."""
    world = ToyWorld(seed=0)
    world.batch(split, 0, 50)  # warm-up: numpy imports, caches
    best = 0.0
    for r in range(repeats):
        start = time.perf_counter()
        world.batch(split, r * n, n)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="images per timed run")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates = {split: round(measure(args.n, split), 1) for split in ("pretrain", "finetune", "concept")}
    # The floor applies to `pretrain` (every style mixed, the teacher's and judge's stream); `concept` is all
    # striped images, the most expensive style, and is reported for information.
    result = {"benchmark": "toyworld_render", "unit": "images/s, one thread", "floor": FLOOR, "rates": rates,
              "ok": rates["pretrain"] >= FLOOR}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
