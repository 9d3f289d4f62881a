"""The Stable Diffusion presets: the paper's recipe, composition of concept sets, the dry run, hub ids offline."""

import os

import pytest
import yaml

from safeprune.cli import main
from safeprune.config import CONFIG_DIR, load_config
from safeprune.errors import UserError


def test_sd21_is_the_papers_recipe():
    cfg = load_config("sd21")
    ft = cfg.finetune
    assert (ft.method, ft.solver.name, ft.unlearn.name, ft.upper.every, ft.max_steps) == ("bilevel", "alternating", "esd", 10, 20000)
    assert (ft.lr, ft.upper.lr, ft.warmup_steps, ft.snr_gamma) == (1e-6, 5e-6, 250, 5.0)
    assert (ft.lambda_diff, ft.lambda_out, ft.lambda_feat) == (1.0, 2.0, 0.1)
    assert ft.batch_size * 4 * ft.grad_accum == 64  # the paper's global batch on its 4 GPUs
    assert (ft.resolution, ft.mixed_precision, ft.teacher_dtype, ft.gradient_checkpointing) == (512, "bf16", "bf16", True)
    assert cfg.model.prediction_type == "v_prediction" and not cfg.model.allow_download
    assert ft.concepts[0].target == "a painting in the style of Van Gogh"  # included artists.yaml


def test_sd15_includes_sd21_with_its_own_teacher():
    sd15, sd21 = load_config("sd15"), load_config("sd21")
    assert sd15.finetune == sd21.finetune and sd15.model.prediction_type == "epsilon"
    assert sd15.model.teacher != sd21.model.teacher


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIG_DIR / "concepts").glob("*.yaml")))
def test_concept_sets_compose_after_a_model_preset(name):
    cfg = load_config([CONFIG_DIR / "sd21.yaml", CONFIG_DIR / "concepts" / name])
    assert cfg.finetune.concepts and all(c.anchor for c in cfg.finetune.concepts)
    assert cfg.finetune.max_steps == 20000  # the model preset is kept; only the concept list is replaced


def test_include_must_be_a_list(tmp_path):
    (tmp_path / "bad.yaml").write_text("include: sd21.yaml\n")
    with pytest.raises(UserError, match="include"):
        load_config(tmp_path / "bad.yaml")


def test_dry_run_prints_the_recipe_and_derived_lines(capsys):
    for argv in (["configs/sd21.yaml"], ["--config", "configs/sd21.yaml"]):
        assert main(["finetune", *argv, "--dry-run", "finetune.max_steps=100"]) == 0
        out = capsys.readouterr().out
        assert "teacher: stabilityai/stable-diffusion-2-1" in out and "max_steps: 100" in out
        assert "global batch = 16 per process x 1 processes x 1 accumulation = 16" in out
        assert "100 iterations, 10 upper steps" in out and "estimated peak memory per GPU" in out


def test_hub_id_offline_is_a_one_line_error(capsys, tmp_path):
    from safeprune.models.io import pretrained_folder

    with pytest.raises(UserError, match="is not in the Hugging Face cache; download it") as err:
        pretrained_folder("safeprune-tests/no-such-model")
    assert "\n" not in str(err.value) and "--allow-download" in str(err.value)
    code = main(["finetune", "--student", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--teacher", "safeprune-tests/no-such-model"])
    assert code == 2 and "model.allow_download=true" in capsys.readouterr().err


def test_presets_merge_in_command_line_order(capsys):
    """`--config sd21 concepts/nudity.yaml` (the nudity experiment) must end with nudity, not the artists."""
    nudity = str(CONFIG_DIR / "concepts" / "nudity.yaml")
    orders = {"nudity": (["--config", "sd21", nudity], ["--config=sd21", nudity], [str(CONFIG_DIR / "sd21.yaml"), nudity]),
              "a painting in the style of Van Gogh": ([nudity, "--config", "sd21"],)}
    for first_target, argvs in orders.items():
        for argv in argvs:  # `prune --dry-run` prints the whole resolved config, without the finetune estimate
            assert main(["prune", "--out", "x", *argv, "--dry-run"]) == 0
            concepts = yaml.safe_load(capsys.readouterr().out)["finetune"]["concepts"]
            assert concepts[0]["target"] == first_target, argv


@pytest.mark.parametrize("flag", ["model.allow_download=true", "finetune.data.hub_data=true"])
def test_asking_for_the_hub_lifts_the_offline_default(monkeypatch, capsys, flag):
    """finetune.data.hub_data=true must be able to download (its error message says so), as --allow-download can."""
    import safeprune.cli

    monkeypatch.setattr(safeprune.cli, "_OFFLINE_BY_DEFAULT", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # monkeypatch restores both afterwards
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert main(["prune", "--out", "x", flag, "--dry-run"]) == 0
    capsys.readouterr()
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
