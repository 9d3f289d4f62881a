"""The contract every registered metric keeps (parametrised over `METRICS`): on a tiny random-weight model it
returns at least one number, every one finite, and costs no extra sampling for sets another metric already
drew (one `EvalContext` per model). The real-scale metrics run on the tiny local weights of test_metrics.py."""

import math

import pytest
from test_metrics import real_scale_weights  # noqa: F401  (the tiny local FID / CLIP weights, a fixture)

from safeprune.config import load_config
from safeprune.data.toyworld import ToyWorld
from safeprune.eval.metrics import METRICS, EvalContext, run_metrics


@pytest.fixture(scope="module")
def context(toy_pipe, judge, real_scale_weights):  # noqa: F811
    cfg = load_config(None, ["eval.seeds_per_prompt=1", "eval.max_prompts=3", "eval.heldout=false",
                             "eval.affinity_images=4", "sample.steps=2",
                             f"eval.inception_path={real_scale_weights / 'inception.pt'}",
                             f"eval.clip_path={real_scale_weights / 'clip'}"])
    return EvalContext(toy_pipe, ToyWorld(cfg.toyworld, seed=0), cfg, judge, reference_pipe=toy_pipe)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_finite_on_a_tiny_model(name, context):
    result = run_metrics(context, [name])
    values = {k: v for k, v in result.items() if k not in ("eval_images", "eval_seconds")}
    assert values, f"{name} returned nothing"
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), values
    assert context.n_generated <= 6  # forget + retain, 3 prompts each, drawn once for every metric
