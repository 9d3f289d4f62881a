"""`demo.overrides`: a row the demo does not run is a one-line error before any work (nothing is written)."""

import pytest

from safeprune.config import load_config, to_dict
from safeprune.errors import UserError
from safeprune.recipes.demo import FINETUNE_ROWS, demo


def test_an_override_for_an_unknown_row_fails_before_anything_is_written(tmp_path):
    cfg = load_config(None, ["demo.overrides.two_stag=[finetune.upper.lr=5e-4]"])
    with pytest.raises(UserError, match="demo.overrides names \\['two_stag'\\]") as err:
        demo(cfg, tmp_path / "demo")
    assert all(r["method"] in str(err.value) for r in FINETUNE_ROWS.values()) and not (tmp_path / "demo").exists()


def test_a_baseline_runs_with_its_own_overrides_only(tmp_path, monkeypatch):
    from safeprune.recipes import demo as demo_module
    from safeprune.recipes import unlearn as unlearn_module

    seen = []
    monkeypatch.setattr(unlearn_module, "unlearn", lambda cfg: seen.append(cfg) or tmp_path)
    cfg = load_config(None, ["demo.overrides.uce=[unlearn.uce.lambda_preserve=0.3]"])
    demo_module._baseline(cfg, "uce", tmp_path / "seed0")
    demo_module._baseline(cfg, "conceptprune", tmp_path / "seed0")
    assert seen[0].unlearn.uce.lambda_preserve == 0.3 and seen[0].unlearn.method == "uce"
    assert seen[1].unlearn.uce.lambda_preserve == cfg.unlearn.uce.lambda_preserve != 0.3
    assert seen[1].unlearn.conceptprune.sparsity == 0.1  # the committed sweep choice (DemoConfig default)


def test_an_explicit_override_wins_over_a_demo_overrides_entry():
    """`demo finetune.upper.lr=1e-3` used to run bilevel at demo.overrides.bilevel's 5e-4 without a word."""
    cfg = load_config(None, ["finetune.upper.lr=1e-3"])
    assert cfg.finetune.upper.lr == 1e-3
    assert cfg.demo.overrides["bilevel"] == ["finetune.upper.images=student"]  # the entry's other fields stay
    # what bilevel's row runs with, applied the way demo.finetune_row applies it
    row = load_config(base=to_dict(cfg), overrides=cfg.demo.overrides["bilevel"])
    assert row.finetune.upper.lr == 1e-3 and row.finetune.upper.images == "student"
    # without the explicit field the entry still applies; an emptied entry stays empty through a saved config
    default = ["finetune.upper.lr=5e-4", "finetune.upper.images=student"]
    assert load_config(None, []).demo.overrides["bilevel"] == default
    emptied = load_config(None, ["finetune.upper.lr=1e-3", "finetune.upper.images=concept"])
    assert emptied.demo.overrides["bilevel"] == [] == load_config(base=to_dict(emptied)).demo.overrides["bilevel"]
    # overrides of the demo section itself are entries, not explicit fields
    own = load_config(None, ["demo.overrides.bilevel=[finetune.upper.lr=2e-4]"])
    assert own.demo.overrides["bilevel"] == ["finetune.upper.lr=2e-4"]
