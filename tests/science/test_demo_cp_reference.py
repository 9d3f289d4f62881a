"""The demo scores CP as the paper does: the suppressing rows against their seed's distilled, unerased student."""

import json

import pytest

import safeprune.eval.judge
import safeprune.eval.metrics
import safeprune.models.io
import safeprune.models.shipped
import safeprune.recipes.finetune
import safeprune.recipes.prune
from safeprune.config import load_config
from safeprune.errors import UserError
from safeprune.recipes import demo


class StableDiffusionPipeline:  # a stand-in pipeline: its class name tells the demo its family (sd)
    def __init__(self, name):
        self.name = name
        self.unet = f"{name}.unet"

    def __repr__(self):
        return self.name


Model = StableDiffusionPipeline


def _mocked_demo(tmp_path, monkeypatch, overrides):
    """demo.demo with every heavy part replaced: returns (evaluate_model calls, finetune configs, curve-eval calls,
    write_report arguments)."""
    calls = []  # (model, reference, cache) per evaluate_model call
    runs = []  # the Config of every finetune call
    curve_calls = []  # (step, unet) of every curve evaluation made by the demo itself

    def prune_student(cfg):
        out = tmp_path / "demo" / "student"
        out.mkdir(parents=True)
        (out / "prune_report.json").write_text(json.dumps({"params_before": 2e6, "params_after": 1e6}))

    def finetune(cfg, on_eval=None):
        runs.append(cfg)
        out = tmp_path / "demo" / cfg.paths.out.split("demo/")[1]
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"wall_s": 1.0, "counts": {"student_fwd": 1}}))
        (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/leakage": 0.5, "eval/fd": 7.0}) + "\n")
        return out

    def evaluate_model(pipe, world, cfg, reference_pipe=None, judge=None, reference_cache=None):
        calls.append((pipe, reference_pipe, reference_cache))
        return {"valid": 1.0, "leakage": 0.5, "forget_valid": 1.0, "retention": 1.0, "fd": 5.0}

    teacher = Model("teacher")
    monkeypatch.setattr(safeprune.recipes.prune, "prune_student", prune_student)
    monkeypatch.setattr(safeprune.recipes.finetune, "finetune", finetune)
    monkeypatch.setattr(safeprune.eval.metrics, "evaluate_model", evaluate_model)
    monkeypatch.setattr(safeprune.eval.judge, "load_judge", lambda: "judge")
    monkeypatch.setattr(safeprune.models.shipped, "load_teacher", lambda name="": teacher)
    monkeypatch.setattr(safeprune.models.io, "load_pipeline", lambda path: Model("/".join(str(path).split("/")[-2:])))
    monkeypatch.setattr(demo, "_sampling_ms", lambda pipe, cfg: 1.0)
    monkeypatch.setattr(demo, "model_grid", lambda *a: None)

    def baseline(cfg, method, seed_dir):  # a finished erasure run
        out = seed_dir / demo.baseline_row(method)
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"seconds": 1.0}))
        return out

    monkeypatch.setattr(demo, "_baseline", baseline)
    monkeypatch.setattr(demo, "_curve_eval", lambda *a: lambda step, unet: curve_calls.append((step, unet)) or
                        {"leakage": 0.9, "fd": 30.0})
    captured = {}
    monkeypatch.setattr(demo, "write_report", lambda out, rows, curves, grid, notes, extra: captured.update(
        extra, rows=rows, curves=curves, notes=notes))
    demo.demo(load_config(overrides=overrides), tmp_path / "demo")
    return calls, runs, curve_calls, captured


def test_suppressing_rows_use_the_distilled_student_as_cp_reference(tmp_path, monkeypatch):
    calls, _, _, captured = _mocked_demo(tmp_path, monkeypatch, [  # rows of distills only
        "demo.seeds=2", "eval.resurgence_steps=0", "demo.baselines=[]"])

    by_name = {repr(model): (reference, cache) for model, reference, cache in calls}
    assert repr(by_name["teacher"][0]) == "teacher"  # the teacher row: its own reference, as before
    for seed in (0, 1):
        reference, cache = by_name[f"seed{seed}/distill"]
        assert repr(reference) == f"seed{seed}/distill"  # its own reference: CP 0 by construction
        for method in ("distill+bilevel_loss", "bilevel", "denoise_only"):  # the suppressing rows (two_stage runs in distill+bilevel_loss/)
            assert by_name[f"seed{seed}/{method}"][0] is reference  # the same seed's distilled student ...
            assert by_name[f"seed{seed}/{method}"][1] is cache  # ... whose images are drawn once
    assert by_name["seed0/distill"][1] is not by_name["seed1/distill"][1]
    assert captured["cp_reference"]["bilevel"] == "distill" and captured["cp_reference"]["teacher"] == "teacher"


def test_control_rows_run_once_or_per_seed_at_distill_s_budget(tmp_path, monkeypatch):
    calls, runs, curve_calls, captured = _mocked_demo(tmp_path, monkeypatch, [
        "demo.seeds=2", "eval.resurgence_steps=0", "demo.baselines=[uce]", "finetune.max_steps=70"])
    assert list(captured["rows"]) == ["teacher", "pruned", "denoise_only", "distill", "distill+UCE",
                                      "distill+bilevel_loss", "bilevel"]
    pruned = [(ref, cache) for model, ref, cache in calls if repr(model) == "demo/student"]
    assert len(pruned) == 1 and repr(pruned[0][0]) == "teacher"  # shared: evaluated once, not per seed
    assert captured["cp_reference"]["pruned"] == "teacher" and captured["cp_reference"]["denoise_only"] == "distill"
    by_dir = {cfg.paths.out.split("demo/")[1]: cfg for cfg in runs}
    for seed in (0, 1):
        control, distill = by_dir[f"seed{seed}/denoise_only"], by_dir[f"seed{seed}/distill"]
        assert (control.finetune.lambda_out, control.finetune.lambda_feat) == (0.0, 0.0)
        assert distill.finetune.lambda_out > 0 and distill.finetune.lambda_feat > 0
        # the same run otherwise: method, budget, seed, curve period
        assert control.finetune.method == distill.finetune.method == "distill" and control.seed == distill.seed == seed
        assert control.finetune.max_steps == distill.finetune.max_steps == 70
        assert control.finetune.eval_every_steps == distill.finetune.eval_every_steps == control.demo.curve_every
    # the recovery curves start at the pruned student (one curve evaluation, step 0), both seeds' points follow
    assert curve_calls == [(0, "demo/student.unet")]
    for name in ("denoise_only", "distill"):
        assert [p["step"] for p in captured["curves"][name]] == [0, 2, 0, 2]
    assert [p["step"] for p in captured["curves"]["bilevel"]] == [2, 2]
    assert "pruned" in captured["leaks"] and "denoise_only" in captured["leaks"]


def test_no_controls_runs_neither(tmp_path, monkeypatch):
    calls, runs, curve_calls, captured = _mocked_demo(tmp_path, monkeypatch, [
        "demo.controls=[]", "eval.resurgence_steps=0", "demo.baselines=[]"])
    assert list(captured["rows"]) == ["teacher", "distill", "distill+bilevel_loss", "bilevel"]
    assert not curve_calls and all("denoise_only" not in cfg.paths.out for cfg in runs)


def test_an_unknown_control_is_a_user_error():
    with pytest.raises(UserError, match="denoise_only"):
        load_config(overrides=["demo.controls=[pruned, denoise]"])
    with pytest.raises(UserError, match="twice"):
        load_config(overrides=["demo.controls=[pruned, pruned]"])
