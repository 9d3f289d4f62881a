"""Tune the demo's bilevel run: one configuration (trailing overrides) x seeds -> the judge's figures.

Prunes the shipped teacher once (the demo's `prune.*`), fine-tunes `finetune.method` (default bilevel) with
the overrides for each seed, evaluates leakage / retention / adherence / fd exactly as the demo does (same
`eval.*`, same judge; the evaluation is never a tuning knob), and appends one JSON line per seed to
OUT/results.jsonl. docs/demo/tuning.md lists the runs behind the demo's defaults.

    OMP_NUM_THREADS=1 python benchmarks/sweep_bilevel.py esd_anchor_eta2 finetune.unlearn=esd_anchor finetune.unlearn.eta=2
"""

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from safeprune.config import load_config
from safeprune.data.toyworld import ToyWorld
from safeprune.eval.judge import load_judge
from safeprune.eval.metrics import evaluate_model
from safeprune.models.io import load_pipeline
from safeprune.models.shipped import load_teacher
from safeprune.recipes.finetune import finetune
from safeprune.recipes.prune import prune_student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="label of this configuration in results.jsonl")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    parser.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds")
    parser.add_argument("--out", default="runs/sweep", help="folder: student/, runs/, results.jsonl")
    args = parser.parse_args()
    root = Path(args.out)
    base = load_config(None, ["eval.metrics=[valid,leakage,retention,adherence,fd]", *args.overrides])
    student = root / "student"
    if not student.exists():  # every configuration starts from the same pruned student
        prune_student(dataclasses.replace(base, paths=dataclasses.replace(base.paths, out=str(student))))
    world, judge, teacher = ToyWorld(base.toyworld, seed=base.seed), load_judge(), load_teacher()
    for seed in map(int, args.seeds.split(",")):
        out = root / "runs" / f"{args.name}_s{seed}"
        cfg = dataclasses.replace(base, seed=seed, paths=dataclasses.replace(base.paths, student=str(student), out=str(out)))
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        finetune(cfg)
        train_s = time.perf_counter() - start
        row = evaluate_model(load_pipeline(out), world, cfg, teacher, judge, {})
        record = {"name": args.name, "seed": seed, "overrides": args.overrides, "train_s": round(train_s),
                  **{k: round(v, 3) for k, v in row.items() if isinstance(v, float)}}
        print(json.dumps(record), flush=True)
        with open(root / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
