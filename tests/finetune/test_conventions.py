"""Training conventions of diffusers' scripts: mixed precision from `accelerate launch`, report_to, learning rates
and validation images in the tracker, --image-column/--caption-column with metadata.csv, the number of training
images used, and a one-line error for an unsupported (SDXL-style) UNet."""

import csv
import json

import pytest

from safeprune.cli import main
from safeprune.config import load_config
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError
from safeprune.recipes.finetune import resolve_mixed_precision


@pytest.mark.parametrize("configured, launched, chosen", [("", "", "no"), ("", "bf16", "bf16"), ("fp16", "", "fp16"),
                                                          ("bf16", "bf16", "bf16")])
def test_the_launchers_mixed_precision_wins_unless_set(monkeypatch, configured, launched, chosen):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    cfg = load_config(None, [f"finetune.mixed_precision={configured}"] if configured else [])
    assert resolve_mixed_precision(cfg).finetune.mixed_precision == chosen


def test_a_mixed_precision_conflict_is_one_line(monkeypatch, finetune_cli, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="accelerate launch was given mixed_precision=fp16"):
        resolve_mixed_precision(load_config(None, ["finetune.mixed_precision=bf16"]))
    code, err = finetune_cli(tmp_path / "run", "finetune.mixed_precision=bf16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_validation_images_and_learning_rates_reach_tensorboard(finetune_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "2", "--method", "distill", "finetune.validation_every_steps=1",
                             "finetune.validation_prompts=[a red circle]", "sample.steps=2")
    assert code == 0, err
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    events = EventAccumulator(str(out / "logs" / "finetune"), size_guidance={"images": 0}).Reload()
    assert "lr/lower" in events.Tags()["scalars"] and "lower/ft" in events.Tags()["scalars"]
    images = events.Images("validation")  # add_images of N images: one tag entry per step
    assert sorted({e.step for e in images}) == [1, 2]


def test_report_to_none_writes_no_tracker_files(finetune_cli, tmp_path):
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "1", "--method", "distill", "finetune.report_to=none")
    assert code == 0, err
    assert not list(out.rglob("events.out.tfevents.*")) and (out / "metrics.jsonl").is_file()
    assert "mixed_precision: 'no'" in (out / "config.yaml").read_text()  # the resolved value, not ''


def _csv_folder(folder, n):
    """An image folder whose metadata.csv uses its own column names (path, description)."""
    world = ToyWorld()
    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "description"])
        for i in range(n):
            image, caption, _ = world.sample("finetune", i)
            from PIL import Image

            Image.fromarray(image).save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", caption])
    return folder


def test_columns_metadata_csv_and_the_training_images_used(finetune_cli, tmp_path, capsys):
    data = _csv_folder(tmp_path / "data", 6)
    code, err = finetune_cli(tmp_path / "bad", "--data", str(data), "--max-steps", "1", "--method", "distill")
    assert code == 2 and "has no `file_name` column" in err and "--image-column" in err
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="trains on 4 of the 6 images"):
        code, err = finetune_cli(out, "--data", str(data), "--image-column", "path", "--caption-column",
                                 "description", "--max-steps", "1", "--method", "distill", "finetune.data.pool=4")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["training_images"], summary["source_images"], summary["data_mode"]) == (4, 6, "pool")


@pytest.fixture
def sdxl_config(tmp_path):
    config = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 32],
              "cross_attention_dim": 16, "norm_num_groups": 8, "addition_embed_type": "text_time",
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64}
    path = tmp_path / "sdxl_unet.json"
    path.write_text(json.dumps(config))
    return path


def test_sdxl_is_planned_by_depth_refused_by_channels_and_needs_an_sdxl_teacher_in_finetune(sdxl_config, tmp_path, capsys, finetune_cli):
    from diffusers import UNet2DConditionModel

    code = main(["prune", "--unet-config", str(sdxl_config), "--out", str(tmp_path / "p")])  # channels
    err = capsys.readouterr().err
    assert code == 2 and "added embeddings" in err and len(err.strip().splitlines()) == 1
    code = main(["prune", "--unet-config", str(sdxl_config), "--method", "depth", "--ratio", "0.05",
                 "--out", str(tmp_path / "d")])  # a plan on the meta device needs no SDXL pipeline inputs
    assert code == 0 and (tmp_path / "d" / "plan.json").is_file(), capsys.readouterr().err
    # finetune takes SDXL students (tests/backbones), but only from an SDXL teacher
    UNet2DConditionModel.from_config(json.loads(sdxl_config.read_text())).save_pretrained(tmp_path / "student")
    code, err = finetune_cli(tmp_path / "run", "--student", str(tmp_path / "student"), "--max-steps", "1")
    assert code == 2 and "is a sdxl model but the teacher" in err.strip().splitlines()[-1]


def test_report_to_is_validated():
    with pytest.raises(UserError, match="report_to"):
        load_config(None, ["finetune.report_to=mlflow"])
    assert load_config(None, []).finetune.report_to == "tensorboard"
