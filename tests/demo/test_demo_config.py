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
