"""Metric maths on synthetic features, and every judge-based metric on REAL renderer images (no sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safeprune.config import load_config
from safeprune.data.toyworld import Labels, ToyWorld, draw
from safeprune.errors import UserError
from safeprune.eval.features import clip_score, frechet_distance, mmd
from safeprune.eval.metrics import (
    METRICS,
    EvalContext,
    Generated,
    concept_affinity,
    evaluate_model,
    run_metrics,
    swap_concept,
    teacher_quality,
)

# ----------------------------------------------------------------------------- maths


def test_frechet_distance_of_a_set_with_itself_is_zero_and_matches_an_affine_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))  # correlated features
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # y = 2x + 1: S_y = 4 S_x, so FD = ||mu_x - mu_y||^2 + Tr(S_x + 4 S_x - 2 * 2 S_x) = ||.||^2 + Tr(S_x).
    y = 2 * x + 1
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(np.cov(x.T))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-6)


def test_frechet_distance_of_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, size=(20000, 4)), rng.normal(0.5, 2, size=(20000, 4))
    closed = 4 * 0.5**2 + 4 * (1 - 2) ** 2  # diagonal covariances: sum (mu diff)^2 + (sqrt var_a - sqrt var_b)^2
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.05)


def test_mmd_is_zero_on_itself_symmetric_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 8)) * 5, rng.normal(size=(200, 8)) * 5
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert mmd(x, y) == pytest.approx(mmd(y, x))
    assert mmd(x, y + 10) > mmd(x, y + 3) > mmd(x, y) >= -1e-9


def test_clip_score_is_100_cos_clamped_at_zero():
    e = np.eye(3)
    assert clip_score(e, e) == pytest.approx(100.0)
    assert clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(0.0)
    assert clip_score(e, -e) == pytest.approx(0.0)  # negative similarity counts as 0, as in Hessel et al.
    assert clip_score([[1.0, 1.0]], [[1.0, 0.0]]) == pytest.approx(100 / math.sqrt(2))


def test_real_scale_metrics_name_the_missing_weights(tmp_path):
    from safeprune.eval.extractors import CLIPEncoder, InceptionFeatures

    with pytest.raises(UserError, match="eval.inception_path"):
        InceptionFeatures("")
    with pytest.raises(UserError, match="eval.clip_path"):
        CLIPEncoder(str(tmp_path))


# ----------------------------------------------------------------------------- registry on real images


class RealImagesContext(EvalContext):
    """An EvalContext whose "generated" images are renderer images of the prompts' labels, optionally with the
    style replaced: it tests the metrics and the judge, not a model."""

    def __init__(self, cfg, judge, style_override=None, reference_style=None):
        super().__init__(pipe="model", world=ToyWorld(cfg.toyworld, seed=cfg.seed), cfg=cfg, judge=judge,
                         reference_pipe="reference" if reference_style else None)
        self.style_override, self.reference_style = style_override, reference_style

    def generated(self, set_name, reference=False):
        key = (set_name, reference)
        if key not in self._cache:
            records = self.records(set_name)
            style = self.reference_style if reference else self.style_override
            images = np.stack([draw(Labels(r["shape"], r["colour"], style or r["style"]),
                                    np.random.default_rng([99, k, int(reference)]), 32) for k, r in enumerate(records)])
            self._cache[key] = Generated(records, images, self.judge.predict(images), self.judge.features(images))
        return self._cache[key]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["eval.seeds_per_prompt=2", "eval.max_prompts=20"])


def test_leakage_is_one_on_real_forbidden_style_images_and_zero_on_other_styles(cfg, judge):
    real = run_metrics(RealImagesContext(cfg, judge), ["valid", "leakage", "retention", "adherence"])
    assert real["leakage"] >= 0.97 and real["heldout_leakage"] >= 0.97
    assert real["valid"] >= 0.97 and real["retention"] >= 0.97 and real["adherence"] >= 0.97
    assert real["suppressed"] <= 0.03
    other = run_metrics(RealImagesContext(cfg, judge, style_override="plain"), ["leakage"])
    assert other["leakage"] <= 0.03 and other["suppressed"] >= 0.97 and other["forget_valid"] >= 0.97


def test_fd_is_small_for_real_images_and_large_for_the_wrong_style(cfg, judge):
    real = run_metrics(RealImagesContext(cfg, judge), ["fd"])
    wrong = run_metrics(RealImagesContext(cfg, judge, style_override="night"), ["fd"])
    assert real["fd"] < 0.2 * wrong["fd"], (real, wrong)


def test_cp_counts_forget_images_less_like_the_concept_than_the_reference(cfg, judge):
    suppressed = run_metrics(RealImagesContext(cfg, judge, style_override="plain", reference_style="striped"), ["cp"])
    assert suppressed["cp"] >= 0.97
    leaking = run_metrics(RealImagesContext(cfg, judge, reference_style="plain"), ["cp"])
    assert leaking["cp"] <= 0.03
    assert "cp" not in run_metrics(RealImagesContext(cfg, judge), ["cp"])  # no reference model: no CP score


def test_unknown_metric_lists_the_valid_ones(cfg, judge):
    with pytest.raises(UserError, match="leakage"):
        run_metrics(RealImagesContext(cfg, judge), ["leakge"])
    assert {"valid", "leakage", "retention", "adherence", "fd", "cp", "concept_affinity"} <= set(METRICS)


def test_records_use_the_same_seeds_for_every_model_and_cover_every_style(cfg, judge):
    a, b = RealImagesContext(cfg, judge), RealImagesContext(cfg, judge, style_override="plain")
    ra = a.records("retain")
    assert [r["seed"] for r in ra] == [r["seed"] for r in b.records("retain")]
    assert len(ra) == 2 * 20 and len({r["seed"] for r in ra}) == len(ra)
    assert {r["style"] for r in ra} == {"plain", "outline", "checkered", "shadow", "night"}


# ----------------------------------------------------------------------------- on a (random) pipeline


def test_swap_concept_replaces_whole_words_only():
    assert swap_concept("a striped red circle", "style", "striped", "plain") == "a plain red circle"
    assert swap_concept("red, reddish", "colour", "red", "blue") == "blue, reddish"


def test_evaluate_model_on_a_random_pipeline_reports_no_objects_not_suppression(toy_pipe, judge):
    cfg = load_config(None, ["eval.seeds_per_prompt=1", "eval.max_prompts=3", "eval.heldout=false",
                             "eval.affinity_images=4", "sample.steps=2"])
    world = ToyWorld(cfg.toyworld, seed=0)
    res = evaluate_model(toy_pipe, world, cfg, reference_pipe=toy_pipe, judge=judge)
    assert res["eval_images"] == 6  # 3 forget + 3 retain, the reference (same model) drawn once
    assert res["valid"] <= 0.2 and res["forget_valid"] <= 0.2  # random weights draw no object ...
    assert res["leakage"] == 0.0 and res["suppressed"] <= 0.2  # ... which is not suppression
    assert math.isfinite(res["fd"]) and res["fd"] > 0 and math.isfinite(res["concept_affinity"])
    assert res["reference_concept_affinity"] == res["concept_affinity"] and res["cp"] <= 0.2


def test_concept_affinity_is_deterministic(toy_pipe):
    world = ToyWorld(seed=0)
    assert concept_affinity(toy_pipe, world, 4, seed=3) == concept_affinity(toy_pipe, world, 4, seed=3)


def test_teacher_quality_reports_every_style(toy_pipe, judge):
    cfg = load_config(None, ["sample.steps=1"])
    q = teacher_quality(toy_pipe, ToyWorld(seed=0), judge, n_images=12, cfg=cfg)
    assert set(q["per_style"]) == {"plain", "outline", "striped", "checkered", "shadow", "night"}
    assert sum(v["n"] for v in q["per_style"].values()) == 12 == q["n_images"]
    assert q["min_accuracy"] == min(v[a] for v in q["per_style"].values() for a in ("shape", "colour", "style"))


# ----------------------------------------------------------------------------- real-scale metrics, tiny local weights


def test_real_scale_metrics_run_on_the_toy_context(field_weights, judge):
    cfg = load_config(None, ["eval.seeds_per_prompt=1", "eval.max_prompts=8",
                             f"eval.inception_path={field_weights / 'inception'}",
                             f"eval.clip_path={field_weights / 'clip'}", f"eval.cmmd_clip_path={field_weights / 'clip'}"])
    res = run_metrics(RealImagesContext(cfg, judge), ["fid", "clip_score", "cmmd"])
    assert res["fid"] >= 0 and 0 <= res["clip_score"] <= 100 and res["cmmd"] >= -1e-9
    shifted = run_metrics(RealImagesContext(cfg, judge, style_override="night"), ["fid"])
    assert shifted["fid"] > res["fid"]  # night images have other pixel statistics than the real references


def test_shared_reference_cache_is_keyed_by_the_seeds(toy_pipe, judge):
    cache: dict = {}
    gens = []
    for seed in (0, 1):
        cfg = load_config(None, [f"seed={seed}", "eval.seeds_per_prompt=1", "eval.max_prompts=2", "sample.steps=1"])
        ctx = EvalContext("student", ToyWorld(cfg.toyworld, seed=seed), cfg, judge, toy_pipe, cache)
        gens.append(ctx.generated("forget", reference=True))
        assert ctx.generated("forget", reference=True) is gens[-1]  # drawn once per seed
    assert len(cache) == 2 and gens[0].records[0]["seed"] != gens[1].records[0]["seed"]


def test_a_model_evaluated_as_its_own_reference_fills_the_shared_cache(toy_pipe, judge):
    cfg = load_config(None, ["eval.seeds_per_prompt=1", "eval.max_prompts=2", "eval.heldout=false",
                             "eval.affinity_images=2", "sample.steps=1"])
    world, cache = ToyWorld(cfg.toyworld, seed=0), {}
    first = evaluate_model(toy_pipe, world, cfg, toy_pipe, judge, cache)  # the teacher, its own reference
    assert first["eval_images"] == 4
    ctx = EvalContext("student", world, cfg, judge, toy_pipe, cache)
    assert ctx.generated("forget", reference=True) is ctx.reference_cache[next(k for k in cache if k[0] == "forget")]
    assert ctx.n_generated == 0  # the reference's forget images were reused, not drawn again


def test_the_judge_is_one_detector_of_the_registry(cfg, judge):
    from safeprune.eval.detectors import DETECTORS

    assert {"judge", "clip_similarity", "csd", "nudenet"} <= set(DETECTORS)
    leaking = DETECTORS["judge"](RealImagesContext(cfg, judge), "forget")
    clean = DETECTORS["judge"](RealImagesContext(cfg, judge, style_override="plain"), "forget")
    assert leaking.shape == (32,) and leaking.mean() > 0.9 and clean.mean() < 0.1
