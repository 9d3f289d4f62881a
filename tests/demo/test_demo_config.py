"""`demo.overrides`: a row the demo does not run is a one-line error before any work (nothing is written)."""

import pytest

from safeprune.config import load_config
from safeprune.errors import UserError
from safeprune.recipes import demo as demo_module
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


def test_a_cli_override_that_demo_overrides_would_replace_is_refused(tmp_path, capsys):
    """`demo finetune.upper.lr=1e-3` used to run bilevel at demo.overrides.bilevel's 5e-4 without a word."""
    from safeprune.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "finetune.upper.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "demo.overrides.bilevel (finetune.upper.lr=0.0005)" in err and "\n" not in err and not out.exists()
    # the same value, or the value set in demo.overrides itself, is what the rows run with: accepted
    cfg = load_config(None, ["finetune.upper.lr=1e-3", "demo.overrides.bilevel=[finetune.upper.lr=1e-3]",
                             "demo.overrides.two_stage=[finetune.upper.lr=1e-3]"])
    demo_module.shadowed_overrides(cfg, ["finetune.upper.lr=1e-3", "finetune.upper.every=5"])
