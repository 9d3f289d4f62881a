"""`safeprune evaluate --model PATH --out DIR`: the metrics of `eval.metrics` (safeprune.eval.metrics) for one model.

Writes DIR/results.json ({model, reference, metrics: {key: value}}), DIR/grid.png (forget and retain samples,
same seeds for every model) and DIR/config.yaml. The reference model of the CP score and of the teacher's
concept affinity defaults to the shipped toy teacher; the paper scores CP against the distilled, unerased
student (`--reference RUN_DIR` of a `distill` run; safeprune.eval.cp), which the output then names.
"""

from __future__ import annotations

import dataclasses
import json
import math

from safeprune.config import Config, save_config
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import choose
from safeprune.eval.cp import CP_MARGIN
from safeprune.eval.metrics import METRICS, EvalContext, run_metrics
from safeprune.utils import atomic_folder, resolve_device

NEEDS_REFERENCE = ("cp", "concept_affinity")


def _grid(ctx: EvalContext, path) -> None:
    """Two rows per kind: forget and retain images (the first 12 of each set), as evaluated."""
    from safeprune.viz import make_grid, save_image

    rows, labels = [], []
    for name in ("forget", "retain"):
        gen = ctx.drawn(name)
        if gen is not None:
            rows.append(list(gen.images[:12]))
            labels.append(name)
    if rows:
        save_image(make_grid(rows, labels), path)


def run(cfg: Config, args) -> int:
    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else list(cfg.eval.metrics)
    for name in names:
        choose("metric", name, METRICS)  # a typo fails now, not after minutes of sampling
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=names))
    from safeprune.eval.judge import load_judge
    from safeprune.recipes.generate import load_model

    device = resolve_device(cfg.device)
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    model, reference = cfg.paths.model or None, cfg.paths.reference or None
    with atomic_folder(cfg.paths.out) as tmp:
        judge = load_judge(device=device)
        pipe = load_model(model, device)
        reference_pipe = None
        if any(n in NEEDS_REFERENCE for n in names):
            same = reference is None and model is None  # the teacher is its own reference
            reference_pipe = pipe if same else load_model(reference, device)
        ctx = EvalContext(pipe, world, cfg, judge, reference_pipe, progress=True)
        results = run_metrics(ctx, names)
        record = {"model": model or "toy-teacher", "reference": reference or "toy-teacher",
                  "cp_margin": CP_MARGIN if "cp" in names else None, "metrics": results}
        (tmp / "results.json").write_text(json.dumps(record, indent=1))
        _grid(ctx, tmp / "grid.png")
        save_config(cfg, tmp)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) and not math.isnan(value) else
              f"{key:<{width}}  {value}")
    if "cp" in names:  # which model CP is relative to changes its meaning: say it next to the number
        print(f"cp: against {reference or 'the shipped toy teacher'} (margin {CP_MARGIN}); the paper's reference "
              "is the distilled, unerased student (--reference)")
    print(f"wrote {cfg.paths.out}/results.json")
    if model is not None:  # a model folder with a safeprune model card gets the results table
        from safeprune.models.card import add_results
        from safeprune.models.io import model_folder

        if add_results(model_folder(model), results, source=f"{len(results)} metrics, results in {cfg.paths.out}"):
            print(f"added the results to {model_folder(model)}/README.md")
    return 0
