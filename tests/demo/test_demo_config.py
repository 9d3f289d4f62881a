"""`demo.overrides`: a row the demo does not run is a one-line error before any work (nothing is written)."""

import pytest

from safeprune.config import load_config
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
