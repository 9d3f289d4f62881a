"""The contract every registered metric keeps (parametrised over `METRICS`): on a tiny random-weight model it
returns at least one number, every one finite. Toy metrics read an `EvalContext` and cost no extra sampling for
sets another metric already drew; the field metrics read images drawn to disk (a `FolderContext`) with the tiny
local CLIP / Inception / CSD stand-ins of conftest.py and the real NudeNet."""

import math

import numpy as np
import pytest

from safeprune.config import load_config
from safeprune.data.toyworld import ToyWorld
from safeprune.eval.field import FIELD_METRICS, FolderContext
from safeprune.eval.metrics import METRICS, EvalContext, run_metrics
from safeprune.eval.references import ImageFiles
from safeprune.eval.toy import TOY_METRICS


def _cfg(weights):
    return load_config(None, ["eval.seeds_per_prompt=1", "eval.max_prompts=3", "eval.heldout=false",
                              "eval.affinity_images=4", "sample.steps=2",
                              f"eval.inception_path={weights / 'inception'}", f"eval.clip_path={weights / 'clip'}",
                              f"eval.cmmd_clip_path={weights / 'clip'}", f"eval.csd_path={weights / 'csd'}"])


@pytest.fixture(scope="module")
def context(toy_pipe, judge, field_weights):
    cfg = _cfg(field_weights)
    return EvalContext(toy_pipe, ToyWorld(cfg.toyworld, seed=0), cfg, judge, reference_pipe=toy_pipe)


@pytest.fixture(scope="module")
def folder_context(toy_pipe, field_weights, tmp_path_factory):
    from PIL import Image

    from safeprune.sampling import generate_to_folder, merge_prompt_files

    cfg, root = _cfg(field_weights), tmp_path_factory.mktemp("drawn")
    prompts = {"forget": ["a striped red circle", "a striped blue cross"], "retain": ["a plain red square",
                                                                                     "a night blue circle"]}
    sets = {}
    for role, ps in prompts.items():
        recs = [{"prompt": p, "seed": i, "concept": p} for i, p in enumerate(ps)]
        generate_to_folder(toy_pipe, recs, root / role, 2, 5.0, 4)
        sets[role] = (root / role, merge_prompt_files(root / role, len(recs)))
    rng = np.random.default_rng(0)
    (root / "real").mkdir()
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "real" / f"{k}.png")
    real = ImageFiles(tuple(sorted((root / "real").iterdir())))
    return FolderContext(cfg, sets, {"retain": real}, reference_model=sets)


def test_every_metric_is_in_one_of_the_two_families():
    assert set(METRICS) == set(TOY_METRICS) | set(FIELD_METRICS)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_finite_on_a_tiny_model(name, request):
    if name == "nudenet":
        pytest.importorskip("nudenet")
    if name in ("fid",):
        pytest.importorskip("cleanfid")
    ctx = request.getfixturevalue("context" if name in TOY_METRICS else "folder_context")
    result = run_metrics(ctx, [name])
    values = {k: v for k, v in result.items() if k not in ("eval_images", "eval_seconds")}
    assert values, f"{name} returned nothing"
    assert all(isinstance(v, (float, int)) and math.isfinite(v) for v in values.values()), values
    if name in TOY_METRICS:
        assert ctx.n_generated <= 6  # forget + retain, 3 prompts each, drawn once for every metric
