"""The metric registry: the toy world's judge-read metrics (safeprune.eval.toy) and the field's metrics
(safeprune.eval.field: FID, CLIP score, CMMD, style CLIP, CP, CSD, NudeNet), one dict, one `run_metrics`.

A metric is a frozen dataclass called with an evaluation context and returning {key: value}; its registry key is
the `eval.metrics` / `--metrics` value. Adding one is one class + one line in its module's dict.
"""

from __future__ import annotations

import time

from safeprune.config import Config
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import choose
from safeprune.eval.field import FIELD_METRICS
from safeprune.eval.toy import TOY_METRICS, EvalContext, Generated, concept_affinity, swap_concept, teacher_quality

METRICS = {**TOY_METRICS, **FIELD_METRICS}
TOY_DEFAULT = ("valid", "leakage", "retention", "adherence", "fd", "cp", "concept_affinity")  # protocols/toy.yaml

__all__ = ["METRICS", "EvalContext", "Generated", "concept_affinity", "evaluate_model", "run_metrics",
           "swap_concept", "teacher_quality"]


def run_metrics(ctx, names: list[str]) -> dict:
    metrics = [choose("metric", name, METRICS) for name in names]  # fail on a bad name before any sampling
    start = time.perf_counter()
    out: dict = {}
    for metric in metrics:
        out.update(metric(ctx))
    out["eval_images"] = getattr(ctx, "n_generated", 0)
    out["eval_seconds"] = round(time.perf_counter() - start, 2)
    return out


def evaluate_model(pipe, world: ToyWorld, cfg: Config, reference_pipe=None, judge=None,
                   reference_cache: dict | None = None) -> dict:
    """The toy protocol's metrics (cfg.eval.metrics, default the toy list) for `pipe` -> {key: float}; `cp` needs
    `reference_pipe`. Pass the same `reference_cache` dict to several calls with one reference model to draw its
    images once."""
    from safeprune.eval.judge import load_judge

    ctx = EvalContext(pipe, world, cfg, judge or load_judge(), reference_pipe, reference_cache)
    return run_metrics(ctx, list(cfg.eval.metrics) or list(TOY_DEFAULT))
