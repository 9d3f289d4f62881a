"""The saved form: save -> load gives identical outputs, stock diffusers loads what it can, bad folders fail clearly."""

import json

import pytest
import torch
from pruning_helpers import run_unet, unet_inputs

import safeprune
from safeprune.config import BlocksOptions, PruneConfig
from safeprune.errors import UserError
from safeprune.models.io import load_plan, load_unet, save_unet
from safeprune.pruning import prune


@pytest.mark.parametrize("method, options", [("none", {}), ("blocks", {"blocks": BlocksOptions("small")}),
                                             ("channels", {"ratio": 0.4}), ("magnitude", {"ratio": 0.5})])
def test_save_load_identical_outputs(tmp_path, tiny_sd_unet, method, options):
    student, plan = prune(tiny_sd_unet, method, PruneConfig(method=method, **options))
    save_unet(student, tmp_path / "m", plan, base_model=None)
    loaded = safeprune.load_unet(tmp_path / "m")
    inputs = unet_inputs(tiny_sd_unet)
    assert torch.equal(run_unet(loaded, inputs), run_unet(student, inputs))
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "plan.json", "safeprune.json",
                                                           "diffusion_pytorch_model.safetensors"}
    assert load_plan(tmp_path / "m")["base_config"] == plan["base_config"]


@pytest.mark.parametrize("method, options", [("none", {}), ("blocks", {"blocks": BlocksOptions("base")}),
                                             ("channels", {"ratio": 0.3}), ("magnitude", {"ratio": 0.3})])
def test_every_method_on_the_toy_teacher(tmp_path, toy_unet, method, options):
    student, plan = prune(toy_unet, method, PruneConfig(method=method, **options))
    inputs = unet_inputs(toy_unet)
    out = run_unet(student, inputs)
    assert out.shape == run_unet(toy_unet, inputs).shape and torch.isfinite(out).all()
    save_unet(student, tmp_path / "m", plan)
    assert torch.equal(run_unet(load_unet(tmp_path / "m"), inputs), out)


@pytest.mark.parametrize("method, options", [("blocks", {"blocks": BlocksOptions("tiny")}), ("magnitude", {"ratio": 0.3})])
def test_stock_diffusers_loads_config_expressible_models(tmp_path, tiny_sd_unet, method, options):
    from diffusers import UNet2DConditionModel

    student, plan = prune(tiny_sd_unet, method, PruneConfig(method=method, **options))
    save_unet(student, tmp_path / "m", plan)
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "m", local_files_only=True)
    inputs = unet_inputs(tiny_sd_unet)
    assert torch.equal(run_unet(plain, inputs), run_unet(student, inputs))


def test_channel_pruned_folder_records_its_widths(tmp_path, toy_unet, toy_teacher_dir):
    student, plan = prune(toy_unet, "channels", PruneConfig(method="channels", ratio=0.5))
    save_unet(student, tmp_path / "m", plan, base_model=toy_teacher_dir)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["_class_name"] == "PrunedUNet2DConditionModel"
    assert config["block_out_channels"] == list(toy_unet.config.block_out_channels)  # residual streams kept
    assert config["pruned_widths"]["resnet"]["down_blocks.1.resnets.0"] == student.down_blocks[1].resnets[0].conv1.out_channels
    # a local teacher is only a machine-local hint; the portable reference (a hub id) is null here
    meta = json.loads((tmp_path / "m" / "safeprune.json").read_text())
    assert meta == {"base_model": None, "teacher_path": str(toy_teacher_dir.resolve())}


def test_plain_diffusers_folders_load(tmp_path, tiny_sd_unet, toy_teacher_dir, toy_unet):
    tiny_sd_unet.save_pretrained(tmp_path / "plain")
    inputs = unet_inputs(tiny_sd_unet)
    assert torch.equal(run_unet(load_unet(tmp_path / "plain"), inputs), run_unet(tiny_sd_unet, inputs))
    assert load_plan(tmp_path / "plain")["method"] == "none"
    assert load_unet(toy_teacher_dir).config.block_out_channels == toy_unet.config.block_out_channels  # pipeline


def test_pipeline_from_a_pruned_folder_generates(tmp_path, toy_unet, toy_teacher_dir):
    student, plan = prune(toy_unet, "channels", PruneConfig(method="channels", ratio=0.5))
    save_unet(student, tmp_path / "m", plan, base_model=toy_teacher_dir)
    pipe = safeprune.load_pipeline(tmp_path / "m")  # rest of the pipeline from safeprune.json's base_model
    assert pipe.unet.down_blocks[1].resnets[0].conv1.out_channels < 64
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3) and 0.0 <= image.min() and image.max() <= 1.0
    assert type(safeprune.load_pipeline(toy_teacher_dir)).__name__ == "StableDiffusionPipeline"


def test_bad_folders_are_one_line_user_errors(tmp_path, tiny_sd_unet):
    with pytest.raises(UserError, match="not found"):
        load_unet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing config.json"):
        load_unet(tmp_path / "empty")
    tiny_sd_unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(UserError, match="pickled"):
        load_unet(tmp_path / "pickled")
    tiny_sd_unet.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt"):
        load_unet(tmp_path / "corrupt")


def test_weights_that_do_not_fit_the_plan(tmp_path, tiny_sd_unet):
    student, plan = prune(tiny_sd_unet, "channels", PruneConfig(method="channels", ratio=0.4))
    with pytest.raises(UserError, match="do not fit"):  # unpruned weights under a pruning plan: refused on save
        save_unet(tiny_sd_unet, tmp_path / "m", plan)
    assert not (tmp_path / "m").exists()
    save_unet(student, tmp_path / "m", plan)
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").unlink()  # ... and on load
    tiny_sd_unet.save_pretrained(tmp_path / "full")
    (tmp_path / "full" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="do not fit"):
        load_unet(tmp_path / "m")
    with pytest.raises(UserError, match="not empty"):
        save_unet(student, tmp_path / "m", plan)
