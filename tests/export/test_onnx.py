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


def test_export_of_a_pipeline_folder_times_the_tokenizers_text_length(tmp_path, tiny_unet, capsys):
    """A pipeline folder's UNet is checked and timed at the length its CLIP tokenizer encodes, not CLIP's 77."""
    pipe = tmp_path / "pipe"
    tiny_unet.save_pretrained(pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 7}))
    code = main(["export", "--model", str(pipe), "--runs", "1", "--exporter", "torchscript", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "export_report.json").read_text())
    assert report["inputs"]["encoder_hidden_states"][1] == 7 and report["unet"]["max_abs_diff"] <= 1e-4


# The other families' denoisers, tiny: each exports through torchscript in a few seconds.
FAMILIES = {
    "sdxl": ("UNet2DConditionModel", {**TINY, "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
                                      "projection_class_embeddings_input_dim": 6 * 4 + 8}),
    "sd3": ("SD3Transformer2DModel", {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4,
                                      "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                                      "joint_attention_dim": 16, "caption_projection_dim": 16,
                                      "pooled_projection_dim": 8, "pos_embed_max_size": 8}),
    "flux": ("FluxTransformer2DModel", {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                                        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
                                        "pooled_projection_dim": 8, "axes_dims_rope": [2, 2, 4],
                                        "guidance_embeds": True}),
    "pixart": ("PixArtTransformer2DModel", {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 8,
                                            "num_layers": 3, "attention_head_dim": 8, "num_attention_heads": 2,
                                            "cross_attention_dim": 16, "caption_channels": 16}),
}
# each family's student: SDXL magnitude-pruned, SD3 width-pruned (a PrunedSD3Transformer2DModel), Flux and PixArt
# depth-pruned (a stock config, one block fewer)
STUDENTS = {"sdxl": ("magnitude", {"ratio": 0.3}), "sd3": ("channels", {"ratio": 0.1}),
            "flux": ("depth", {"blocks": ["single_transformer_blocks.0"]}),
            "pixart": ("depth", {"blocks": ["transformer_blocks.1"]})}
INPUT_NAMES = {"sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
               "sd3": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
               "flux": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                        "guidance"],
               "pixart": ["hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"]}


def family_student(family, tmp_path):
    import diffusers

    from safeprune.config import DepthOptions

    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    teacher = getattr(diffusers, cls)(**config).eval()
    method, options = STUDENTS[family]
    cfg = PruneConfig(method=method, **({"depth": DepthOptions(**options)} if method == "depth" else options))
    student, plan = prune(teacher, method, cfg)
    save_unet(student, tmp_path / "student", plan)
    teacher.save_pretrained(tmp_path / "teacher")
    return load_unet(tmp_path / "student")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_faithfully(tmp_path, family):
    """Each family's student exports with the inputs its pipeline passes (Flux: packed latents, position ids and
    guidance; PixArt: the T5 mask, half padding here) and matches torch; batch and text length stay dynamic."""
    import onnxruntime

    from safeprune.export import graph_axes

    student = family_student(family, tmp_path)
    side = 4 if family == "flux" else None  # Flux's config has no sample size (1024 px): 2x2 latent tokens
    inputs = example_inputs(student, batch=2, text_tokens=6, sample_size=side)
    assert list(inputs) == INPUT_NAMES[family]
    path = export_onnx(student, tmp_path / "model.onnx", inputs, exporter="torchscript")
    graph = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in graph.get_inputs()] == INPUT_NAMES[family]
    result = check_and_time(path, student, inputs, runs=1, threads=1)
    assert result["max_abs_diff"] <= 1e-4 and result["latency_ms"] > 0
    if family == "pixart":  # the mask is honoured: padding states do not move the ONNX output
        assert 0 < int(inputs["encoder_attention_mask"].sum()) < inputs["encoder_attention_mask"].numel()
        padded = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].clone()}
        padded["encoder_hidden_states"][:, 3:] += 1.0  # the mask keeps the first 3 of 6 tokens
        feed = {k: v.numpy() for k, v in padded.items()}
        base = graph.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert abs(graph.run(None, feed)[0] - base).max() <= 1e-5
    if graph_axes(student, inputs, "torchscript"):  # Flux's torchscript graph has static shapes (export.py)
        other = example_inputs(student, batch=3, text_tokens=5, seed=1, sample_size=side)
        assert check_and_time(path, student, other, runs=1, threads=1)["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_flux_exports_with_dynamic_axes_through_dynamo(tmp_path):
    """The dynamo exporter (the CLI's default) keeps Flux's batch and text axes dynamic (~60 s)."""
    student = family_student("flux", tmp_path)
    inputs = example_inputs(student, batch=2, text_tokens=6, sample_size=4)
    path = export_onnx(student, tmp_path / "model.onnx", inputs, exporter="dynamo")
    other = example_inputs(student, batch=3, text_tokens=5, seed=1, sample_size=4)
    assert check_and_time(path, student, other, runs=1, threads=1)["max_abs_diff"] <= 1e-4


def test_export_command_takes_a_transformer_student(tmp_path, capsys):
    family_student("pixart", tmp_path)
    code = main(["export", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--runs", "1",
                 "--exporter", "torchscript", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["denoiser"] == "PixArtTransformer2DModel" and report["inputs"]["encoder_hidden_states"][1] == 120
    assert report["dynamic_axes"]["encoder_attention_mask"] == {"0": "batch", "1": "text"}
    assert report["transformer"]["max_abs_diff"] <= 1e-4 and report["teacher_transformer"]["max_abs_diff"] <= 1e-4
    assert report["latency_ratio"] > 0 and (tmp_path / "out" / "transformer.onnx").is_file()
