from pathlib import Path

import pytest

from safeprune.config import CONFIG_DIR, Config, load_config, parse_override
from safeprune.errors import UserError


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.finetune.lambda_out == 2.0


def test_override_types_and_int_widening():
    cfg = load_config(None, ["finetune.lr=1e-4", "finetune.max_steps=7", "prune.ratio=0"])
    assert cfg.finetune.lr == pytest.approx(1e-4) and cfg.finetune.max_steps == 7
    assert isinstance(cfg.prune.ratio, float)


@pytest.mark.parametrize("override, words", [
    ("nosuch.key=1", ["unknown config key 'nosuch'", "toyworld"]),
    ("finetune.nosuch=1", ["'finetune.nosuch'", "max_steps"]),
    ("finetune.max_steps=many", ["finetune.max_steps", "int"]),
    ("finetune.gradient_checkpointing=3", ["gradient_checkpointing", "bool"]),
    ("prune.ratio=1.0", ["prune.ratio", "[0, 1)"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)


def test_a_dit_teacher_refuses_the_unet_prediction_type():
    assert load_config(None, ["teacher.arch=dit"]).teacher.prediction_type == "epsilon"  # the recorded default
    with pytest.raises(UserError, match="a dit teacher predicts the rectified-flow velocity"):
        load_config(None, ["teacher.arch=dit", "teacher.prediction_type=v_prediction"])


def test_nested_dataclass_lists():
    cfg = load_config(None, ['finetune.concepts=[{target: "a striped circle", anchor: "a circle"}]'])
    assert cfg.finetune.concepts[0].anchor == "a circle"
    with pytest.raises(UserError, match="target"):
        load_config(None, ['finetune.concepts=[{anchor: "x"}]'])


def test_yes_no_stay_words():
    assert load_config(None, ["finetune.mixed_precision=no"]).finetune.mixed_precision == "no"
    assert load_config(None, ["finetune.gradient_checkpointing=true"]).finetune.gradient_checkpointing is True


def test_parse_override_requires_equals():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(UserError):
        parse_override("finetune.lr")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_loads(path: Path):
    assert isinstance(load_config(path), Config)


def test_preset_by_name_and_missing_file(tmp_path):
    assert load_config("sd21").finetune.lr == pytest.approx(1e-6)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [1, 2")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_demo_overrides_are_keyed_by_row_and_the_old_key_names_the_new_one():
    cfg = load_config(None, ["demo.overrides.two_stage=[finetune.upper.lr=2e-3]"])
    default = load_config().demo.overrides  # the tuning sweep's committed choice (docs/demo/sweep/chosen.json)
    assert cfg.demo.overrides == {**default, "two_stage": ["finetune.upper.lr=2e-3"]} and "two_stage" in default
    with pytest.raises(UserError, match="moved to 'demo.overrides.two_stage'"):
        load_config(None, ["demo.two_stage_overrides=[finetune.upper.lr=5e-4]"])
    with pytest.raises(UserError, match="demo.overrides.two_stage must be a list"):
        load_config(None, ["demo.overrides.two_stage=3"])
    with pytest.raises(UserError, match="demo.overrides must be a mapping"):
        load_config(None, ["demo.overrides=[finetune.lr=1]"])
