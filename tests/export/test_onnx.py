"""`safeprune export --format onnx`: every pruning method's UNet exports, matches torch in onnxruntime, is timed."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from safeprune.cli import main  # noqa: E402
from safeprune.config import BlocksOptions, PruneConfig  # noqa: E402
from safeprune.export import check_and_time, example_inputs, export_onnx  # noqa: E402
from safeprune.models.io import load_unet, save_unet  # noqa: E402
from safeprune.pruning import prune  # noqa: E402

# One stage of attention, 8 channels per group: a UNet the exporter traces in seconds.
TINY = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 32), "attention_head_dim": 8, "cross_attention_dim": 16, "norm_num_groups": 4}
# The default suite exports through the torchscript exporter (seconds); the dynamo exporter (the CLI's default,
# ~30 s of CPU even for this UNet) runs on the channels student in the slow suite.
METHODS = [("channels", {"ratio": 0.3}, "torchscript"), ("blocks", {"blocks": BlocksOptions("small")}, "torchscript"),
           ("magnitude", {"ratio": 0.3}, "torchscript"),
           pytest.param("channels", {"ratio": 0.3}, "dynamo", marks=pytest.mark.slow, id="channels-dynamo")]


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY).eval()


@pytest.mark.parametrize("method, options, exporter", METHODS, ids=["channels", "blocks", "magnitude", "channels-dynamo"])
def test_every_method_exports_faithfully(tmp_path, tiny_unet, method, options, exporter):
    student, plan = prune(tiny_unet, method, PruneConfig(method=method, **options))
    save_unet(student, tmp_path / "m", plan)
    unet = load_unet(tmp_path / "m")  # what a user exports: the saved student (a PrunedUNet for channels)
    inputs = example_inputs(unet, batch=2, text_tokens=3)
    path = export_onnx(unet, tmp_path / "unet.onnx", inputs, exporter=exporter)
    result = check_and_time(path, unet, inputs, runs=2, threads=1)
    assert result["max_abs_diff"] <= 1e-4 and result["latency_ms"] > 0
    # the batch axis is dynamic: another batch size runs and still matches
    other = example_inputs(unet, batch=3, text_tokens=3, seed=1)
    assert check_and_time(path, unet, other, runs=1, threads=1)["max_abs_diff"] <= 1e-4


def test_export_command_reports_the_ratio_to_the_teacher(tmp_path, tiny_unet, capsys):
    student, plan = prune(tiny_unet, "channels", PruneConfig(method="channels", ratio=0.3))
    save_unet(student, tmp_path / "student", plan)
    tiny_unet.save_pretrained(tmp_path / "teacher")
    code = main(["export", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--runs", "2",
                 "--exporter", "torchscript",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["unet"]["max_abs_diff"] <= 1e-4 and report["teacher_unet"]["max_abs_diff"] <= 1e-4
    assert report["latency_ratio"] == pytest.approx(report["unet"]["latency_ms"] / report["teacher_unet"]["latency_ms"],
                                                    rel=1e-3)
    assert (tmp_path / "out" / "unet.onnx").is_file() and (tmp_path / "out" / "teacher_unet.onnx").is_file()
    assert main(["export", "--model", str(tmp_path / "student"), "--format", "tflite", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
