"""benchmarks/sweep_baselines.py: development prompts never used by the report, and a tiny end-to-end run."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sweep_baselines.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_baselines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_development_prompts_are_new_sentences_in_the_toy_vocabulary():
    from safeprune.config import Config
    from safeprune.data.toyworld import (
        HELDOUT_TEMPLATES,
        HELDOUT_TEMPLATES_NO_STYLE,
        TRAIN_TEMPLATES,
        TRAIN_TEMPLATES_NO_STYLE,
        ToyWorld,
    )

    sweep = _sweep()
    reported = set(TRAIN_TEMPLATES + TRAIN_TEMPLATES_NO_STYLE + HELDOUT_TEMPLATES + HELDOUT_TEMPLATES_NO_STYLE)
    assert not reported & set(sweep.DEV_TEMPLATES + sweep.DEV_TEMPLATES_NO_STYLE)
    world, dev = ToyWorld(), sweep.dev_world(Config(), 1000)
    vocabulary = set(world.vocabulary())
    for name in ("forget", "retain", "neutral", "heldout_forget"):
        records = dev.prompts(name)
        assert records and len(records) == len(world.prompts(name.removeprefix("heldout_")))
        report_prompts = {r["prompt"] for s in ("forget", "retain", "neutral", "heldout") for r in world.prompts(s)}
        assert not {r["prompt"] for r in records} & report_prompts
        assert all(w.strip(",") in vocabulary for r in records for w in r["prompt"].split())
    assert all(r["style"] == "striped" for r in dev.prompts("forget"))
    assert len({len(v) for v in sweep.GRID.values()}) == 1  # the same number of configurations per method


def test_score_penalises_missing_objects_and_lost_quality():
    sweep = _sweep()
    distill = {"leakage": 0.9, "forget_valid": 1.0, "retention": 1.0, "fd": 10.0}
    clean = {"leakage": 0.1, "forget_valid": 1.0, "retention": 1.0, "fd": 10.0}
    assert sweep.score(clean, distill) == pytest.approx(0.1)
    assert sweep.score({**clean, "forget_valid": 0.5}, distill) == pytest.approx(0.5)
    assert sweep.score({**clean, "fd": 20.0}, distill) == pytest.approx(0.35)


@pytest.mark.slow
def test_tiny_sweep_end_to_end(random_teacher_dir, monkeypatch, tmp_path, capsys):
    from safeprune.models import shipped

    monkeypatch.setattr(shipped, "teacher_path", lambda: random_teacher_dir)
    sweep = _sweep()
    monkeypatch.setattr(sweep, "GRID", {m: sweep.GRID[m][:2] for m in ("uce", "conceptprune")})
    chosen = sweep.main(["--tiny", "--seeds", "1000", "--methods", "uce,conceptprune", "--out", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in lines] == ["distill", "uce", "uce", "conceptprune", "conceptprune"]
    assert all(r["seed"] == 1000 and "leakage" in r for r in lines)
    assert set(chosen) == {"uce", "conceptprune"} and all(len(c["scores"]) == 2 for c in chosen.values())
    from safeprune.config import load_config

    load_config(str(tmp_path / "chosen.yaml"))  # the reported run's config file loads
    assert (tmp_path / "pareto.png").stat().st_size > 0 and "uce" in (tmp_path / "pareto.md").read_text()
    again = sweep.main(["--tiny", "--seeds", "1000", "--methods", "uce,conceptprune", "--out", str(tmp_path)])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(lines)  # resumed: nothing re-run
    assert again == chosen
    with pytest.raises(SystemExit):
        sweep.main(["--seeds", "0", "--out", str(tmp_path / "x")])  # reported seeds are refused
