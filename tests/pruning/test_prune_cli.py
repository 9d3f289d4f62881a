"""`safeprune prune` end to end: SD-scale planning from a config, the toy teacher, and bad input."""

import json

import pytest
import torch
from pruning_helpers import ASSETS

import safeprune
from safeprune.cli import main

SD15 = str(ASSETS / "sd15_unet_config.json")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("preset, params_m", [("base", 579.4), ("small", 482.3), ("tiny", 323.4)])
def test_bk_sdm_sizes_from_the_sd15_config(capsys, tmp_path, preset, params_m):
    code, out, _ = run(capsys, "prune", "--unet-config", SD15, "--method", "blocks", "--preset", preset,
                       "--out", tmp_path / "d")
    report = json.loads((tmp_path / "d" / "prune_report.json").read_text())
    assert code == 0 and str(report["params_after"]) in out
    assert report["params_before"] / 1e6 == pytest.approx(859.5, rel=5e-3)
    assert report["params_after"] / 1e6 == pytest.approx(params_m, rel=5e-3)
    assert report["macs_after"] < report["macs_before"] and "latency_ms_before" not in report
    # a plan for an architecture, not a model: nothing in the folder may look loadable
    assert {p.name for p in (tmp_path / "d").iterdir()} == {"plan.json", "prune_report.json", "config.yaml"}


def test_channels_on_the_toy_teacher_then_generate(capsys, tmp_path, toy_teacher_dir):
    code, _, _ = run(capsys, "prune", "--model", toy_teacher_dir, "--method", "channels", "--ratio", "0.5",
                     "--out", tmp_path / "d", "prune.latency_runs=2")
    model = tmp_path / "d" / "model"  # a complete diffusers pipeline folder with a model card
    assert code == 0 and (model / "unet" / "plan.json").is_file()
    index = json.loads((model / "model_index.json").read_text())
    assert index["unet"] == ["safeprune", "PrunedUNet2DConditionModel"] and (model / "vae").is_dir()
    card = (model / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "| params |" in card
    report = json.loads((tmp_path / "d" / "prune_report.json").read_text())
    assert report["ratio_of"] == "total parameters" and report["removed_share"] == pytest.approx(0.5, abs=0.03)
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0 and report["macs_ratio"] < 0.6
    pipe = safeprune.load_pipeline(tmp_path / "d")
    image = pipe("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_taylor_importance_from_the_toy_training_data(capsys, tmp_path, toy_teacher_dir):
    code, _, err = run(capsys, "prune", "--model", toy_teacher_dir, "--method", "channels", "--ratio", "0.3",
                       "--importance", "taylor", "--out", tmp_path / "d", "prune.channels.calibration_batches=1",
                       "prune.channels.calibration_batch_size=4", "prune.latency_runs=1")
    assert code == 0, err
    assert json.loads((tmp_path / "d" / "model" / "unet" / "plan.json").read_text())["importance"] == "taylor"
    assert safeprune.load_unet(tmp_path / "d").config.sample_size == 16


@pytest.mark.parametrize("argv", [
    ["--ratio", "1.0"],
    ["--ratio", "-0.1"],
    ["--method", "pixels"],
    ["--importance", "random"],
    ["--method", "blocks", "--preset", "huge"],
    ["--method", "blocks", "--preset", "base", "--unet-config", "{tmp}/lpb1.json"],  # nothing left to remove
    ["--model", "{tmp}/not_a_unet"],
    ["--unet-config", "{tmp}/missing.json"],
])
def test_bad_input_exits_2_and_leaves_no_folder(capsys, tmp_path, toy_teacher_dir, argv):
    (tmp_path / "not_a_unet").mkdir()
    (tmp_path / "lpb1.json").write_text(json.dumps({**json.loads((ASSETS / "sd15_unet_config.json").read_text()),
                                                    "layers_per_block": 1}))
    argv = [a.format(tmp=tmp_path) for a in argv]
    model = [] if any(a in argv for a in ("--model", "--unet-config")) else ["--model", toy_teacher_dir]
    code, _, err = run(capsys, "prune", *model, *argv, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]  # no folder and no temporary sibling
