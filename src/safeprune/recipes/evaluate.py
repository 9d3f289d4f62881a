"""`safeprune evaluate --model PATH --protocol NAME --out DIR`: one model under one evaluation protocol.

Protocols (safeprune/eval/protocols/*.yaml): `toy` (the default: the toy world's judge-read metrics, in memory, as
the demo measures them), `coco` (FID, CLIP score, CMMD on COCO val2017), `styles` (style CLIP, CP, CSD) and `nudity`
(NudeNet on I2P). Every protocol writes DIR/results.json ({protocol, model, reference, metrics: {key: value}}),
DIR/grid.png and DIR/config.yaml; the at-scale protocols also keep their images in DIR/images/ROLE (and the
reference model's in DIR/reference/ROLE), so a killed run resumes and `--images DIR` rescores without sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math

from safeprune.config import Config, save_config
from safeprune.data.toyworld import ToyWorld
from safeprune.eval.cp import CP_MARGIN
from safeprune.eval.judge import load_judge
from safeprune.eval.metrics import EvalContext, run_metrics
from safeprune.eval.run import evaluate, load_protocol, metric_names
from safeprune.sampling import load_model
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


def run_toy(cfg: Config) -> dict:
    """The toy protocol: prompts and real references from the toy world, the judge as detector (in memory)."""
    names = list(cfg.eval.metrics)
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
        record = {"protocol": cfg.eval.protocol, "model": model or "toy-teacher", "reference": reference or "toy-teacher",
                  "cp_margin": CP_MARGIN if "cp" in names else None, "metrics": results}
        (tmp / "results.json").write_text(json.dumps(record, indent=1))
        _grid(ctx, tmp / "grid.png")
        save_config(cfg, tmp)
    return record


def run(cfg: Config, args) -> int:
    if args.metrics:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
            cfg.eval, metrics=[n.strip() for n in args.metrics.split(",") if n.strip()]))
    protocol = load_protocol(cfg.eval.protocol)
    # a typo fails now, not after minutes of sampling; the resolved list is what config.yaml records
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=metric_names(cfg, protocol)))
    if protocol.get("toy_world"):
        record = run_toy(cfg)
    else:
        record = evaluate(cfg, cfg.paths.model or None, cfg.paths.reference or None, cfg.paths.out)
        if record is None:  # a non-main process under accelerate: it drew its share of the images
            return 0
        save_config(cfg, cfg.paths.out)
    results = record["metrics"]
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) and not math.isnan(value) else
              f"{key:<{width}}  {value}")
    if "cp" in cfg.eval.metrics:  # which model CP is relative to changes its meaning: say it next to the number
        print(f"cp: against {cfg.paths.reference or 'the shipped toy teacher'} (margin {CP_MARGIN}); the paper's "
              "reference is the distilled, unerased student (--reference)")
    print(f"wrote {cfg.paths.out}/results.json")
    model = cfg.paths.model or None
    if model is not None:  # a model folder with a safeprune model card gets the results table
        from safeprune.models.card import add_results
        from safeprune.models.io import model_folder

        if add_results(model_folder(model), results, source=f"{len(results)} metrics, results in {cfg.paths.out}"):
            print(f"added the results to {model_folder(model)}/README.md")
    return 0
