"""The demo scores CP as the paper does: the suppressing rows against their seed's distilled, unerased student."""

import json

import safeprune.eval.judge
import safeprune.eval.metrics
import safeprune.models.io
import safeprune.models.shipped
import safeprune.recipes.finetune
import safeprune.recipes.prune
from safeprune.config import load_config
from safeprune.recipes import demo


class Model:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def test_suppressing_rows_use_the_distilled_student_as_cp_reference(tmp_path, monkeypatch):
    calls = []  # (model, reference, cache) per evaluate_model call

    def prune_student(cfg):
        out = tmp_path / "demo" / "student"
        out.mkdir(parents=True)
        (out / "prune_report.json").write_text(json.dumps({"params_before": 2e6, "params_after": 1e6}))

    def finetune(cfg, on_eval=None):
        out = tmp_path / "demo" / cfg.paths.out.split("demo/")[1]
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"wall_s": 1.0, "counts": {"student_fwd": 1}}))
        (out / "metrics.jsonl").write_text("")
        return out

    def evaluate_model(pipe, world, cfg, reference_pipe=None, judge=None, reference_cache=None):
        calls.append((pipe, reference_pipe, reference_cache))
        return {"valid": 1.0, "leakage": 0.5, "forget_valid": 1.0, "retention": 1.0, "fd": 5.0}

    teacher = Model("teacher")
    monkeypatch.setattr(safeprune.recipes.prune, "prune_student", prune_student)
    monkeypatch.setattr(safeprune.recipes.finetune, "finetune", finetune)
    monkeypatch.setattr(safeprune.eval.metrics, "evaluate_model", evaluate_model)
    monkeypatch.setattr(safeprune.eval.judge, "load_judge", lambda: "judge")
    monkeypatch.setattr(safeprune.models.shipped, "load_teacher", lambda: teacher)
    monkeypatch.setattr(safeprune.models.io, "load_pipeline", lambda path: Model("/".join(str(path).split("/")[-2:])))
    monkeypatch.setattr(demo, "_sampling_ms", lambda pipe, cfg: 1.0)
    monkeypatch.setattr(demo, "model_grid", lambda *a: None)
    captured = {}
    monkeypatch.setattr(demo, "write_report", lambda out, rows, curves, grid, notes, extra: captured.update(extra))
    cfg = load_config(overrides=["demo.seeds=2", "eval.resurgence_steps=0", "demo.baselines=[]"])  # rows of distills only
    demo.demo(cfg, tmp_path / "demo")

    by_name = {repr(model): (reference, cache) for model, reference, cache in calls}
    assert by_name["teacher"][0] is teacher  # the teacher row: its own reference, as before
    for seed in (0, 1):
        reference, cache = by_name[f"seed{seed}/distill"]
        assert repr(reference) == f"seed{seed}/distill"  # its own reference: CP 0 by construction
        for method in ("distill+bilevel_loss", "bilevel"):  # the suppressing rows (two_stage runs in distill+bilevel_loss/)
            assert by_name[f"seed{seed}/{method}"][0] is reference  # the same seed's distilled student ...
            assert by_name[f"seed{seed}/{method}"][1] is cache  # ... whose images are drawn once
    assert by_name["seed0/distill"][1] is not by_name["seed1/distill"][1]
    assert captured["cp_reference"]["bilevel"] == "distill" and captured["cp_reference"]["teacher"] == "teacher"
