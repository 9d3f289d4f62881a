"""Model folders load with stock diffusers: DiffusionPipeline.from_pretrained -> save_pretrained -> from_pretrained
gives identical outputs for every pruning method, after the folder was moved; older layouts still load."""

import json
import shutil

import pytest
import torch
from pruning_helpers import run_unet, unet_inputs

from safeprune.config import BlocksOptions, PruneConfig
from safeprune.models.io import build_unet, load_pipeline, load_unet, save_model
from safeprune.pruning import prune

METHODS = [("channels", {"ratio": 0.3}), ("blocks", {"blocks": BlocksOptions("small")}), ("magnitude", {"ratio": 0.3})]


def _image(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, generator=gen, output_type="np").images[0]


@pytest.mark.parametrize("method, options", METHODS, ids=[m for m, _ in METHODS])
def test_stock_diffusers_round_trip(tmp_path, toy_unet, toy_teacher_dir, method, options):
    from diffusers import DiffusionPipeline

    student, plan = prune(toy_unet, method, PruneConfig(method=method, **options))
    save_model(student, tmp_path / "run" / "model", plan, toy_teacher_dir, card={"method": method})
    moved = shutil.move(tmp_path / "run" / "model", tmp_path / "elsewhere")  # no path inside points anywhere
    index = json.loads((moved / "model_index.json").read_text())
    expected = ["safeprune", "PrunedUNet2DConditionModel"] if method == "channels" else ["diffusers",
                                                                                         "UNet2DConditionModel"]
    assert index["unet"] == expected and not any(p.suffix == ".bin" for p in moved.rglob("*"))
    assert "base_model" not in (moved / "README.md").read_text().split("---")[1]  # a local teacher: no hub id

    pipe = DiffusionPipeline.from_pretrained(moved, local_files_only=True)
    assert type(pipe.unet).__name__ == expected[1]
    inputs = unet_inputs(toy_unet)
    assert torch.equal(run_unet(pipe.unet, inputs), run_unet(student, inputs))

    pipe.save_pretrained(tmp_path / "resaved")
    again = DiffusionPipeline.from_pretrained(tmp_path / "resaved", local_files_only=True)
    assert torch.equal(run_unet(again.unet, inputs), run_unet(student, inputs))
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
    assert (_image(pipe) == _image(again)).all()
    # safeprune reads the re-saved folder too (plan.json is gone: the config alone builds the architecture)
    assert torch.equal(run_unet(load_pipeline(tmp_path / "resaved").unet, inputs), run_unet(student, inputs))


def test_channels_class_builds_from_its_config_alone(toy_unet):
    """The recorded widths give exactly the pruned shapes, with no torch-pruning replay and no weights."""
    student, plan = prune(toy_unet, "channels", PruneConfig(method="channels", ratio=0.3))
    built = build_unet(plan)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    assert next(built.parameters()).is_meta


def test_the_previous_bare_layout_still_loads(tmp_path, toy_unet, toy_teacher_dir):
    """Run folders of earlier versions: config.json = the BASE config next to plan.json and the weights."""
    from safetensors.torch import save_file

    student, plan = prune(toy_unet, "channels", PruneConfig(method="channels", ratio=0.3))
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **plan["base_config"]}))
    (old / "plan.json").write_text(json.dumps(plan))
    (old / "safeprune.json").write_text(json.dumps({"base_model": str(toy_teacher_dir)}))
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(old / "diffusion_pytorch_model.safetensors"))
    inputs = unet_inputs(toy_unet)
    assert torch.equal(run_unet(load_unet(old), inputs), run_unet(student, inputs))
    assert torch.equal(run_unet(load_pipeline(old).unet, inputs), run_unet(student, inputs))
