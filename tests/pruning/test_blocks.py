"""`blocks`: BK-SDM's published sizes at SD scale (meta device), weight copying, stock-diffusers round trip."""

import pytest
import torch
from pruning_helpers import TINY_SD, meta_unet, run_unet, sd_config, unet_inputs

from safeprune.config import BlocksOptions, PruneConfig
from safeprune.errors import UserError
from safeprune.pruning import apply_plan, prune
from safeprune.pruning.measure import count_macs, count_parameters

# BK-SDM (Kim et al. 2024): released U-Net sizes (M params) and MACs of one 512-px call (G, layers only).
BK_SDM = {"base": (579.4, 224), "small": (482.3, 218), "tiny": (323.4, 206)}


@pytest.mark.parametrize("preset", list(BK_SDM))
def test_sd15_presets_match_bk_sdm(preset):
    teacher = meta_unet(sd_config("sd15"))
    assert count_parameters(teacher) / 1e6 == pytest.approx(859.5, rel=5e-3)
    student, _ = prune(teacher, "blocks", PruneConfig(method="blocks", blocks=BlocksOptions(preset)))
    params_m, macs_g = BK_SDM[preset]
    assert count_parameters(student) / 1e6 == pytest.approx(params_m, rel=5e-3)
    assert count_macs(student)["macs_excl_attention"] / 1e9 == pytest.approx(macs_g, rel=1e-2)
    assert next(student.parameters()).is_meta  # planning never materialises SD-scale weights


def test_sd21_tiny_trims_per_stage_lists():
    student, plan = prune(meta_unet(sd_config("sd21")), "blocks", PruneConfig(method="blocks", blocks=BlocksOptions("tiny")))
    assert plan["config"]["attention_head_dim"] == [5, 10, 20]
    assert plan["config"]["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert student.mid_block is None and len(student.up_blocks) == 3


def test_weights_come_from_the_kept_blocks(tiny_sd_unet):
    student, _ = prune(tiny_sd_unet, "blocks", PruneConfig(method="blocks", blocks=BlocksOptions("tiny")))
    t, s = tiny_sd_unet.state_dict(), student.state_dict()
    # down pairs keep their names; up pair 1 of the student is the teacher's pair 2 (BK-SDM), one stage later
    assert torch.equal(s["down_blocks.0.resnets.0.conv1.weight"], t["down_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(s["up_blocks.0.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(s["up_blocks.2.attentions.1.proj_in.weight"], t["up_blocks.3.attentions.2.proj_in.weight"])
    assert s["up_blocks.0.resnets.1.conv1.weight"].data_ptr() != t["up_blocks.1.resnets.2.conv1.weight"].data_ptr()


@pytest.mark.parametrize("preset", ["base", "small", "tiny"])
def test_output_shape_kept_and_plan_replays(tiny_sd_unet, preset):
    inputs = unet_inputs(tiny_sd_unet)
    student, plan = prune(tiny_sd_unet, "blocks", PruneConfig(method="blocks", blocks=BlocksOptions(preset)))
    out = run_unet(student, inputs)
    assert out.shape == run_unet(tiny_sd_unet, inputs).shape
    assert torch.equal(run_unet(apply_plan(tiny_sd_unet, plan), inputs), out)


def test_toy_teacher_presets(toy_unet):
    inputs = unet_inputs(toy_unet)
    sizes = [count_parameters(toy_unet)]
    for preset in ("base", "small", "tiny"):
        student, _ = prune(toy_unet, "blocks", PruneConfig(method="blocks", blocks=BlocksOptions(preset)))
        assert run_unet(student, inputs).shape == (2, 4, 16, 16)
        sizes.append(count_parameters(student))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


@pytest.mark.parametrize("overrides, preset, words", [
    ({"layers_per_block": 1}, "base", "layers_per_block=1"),
    ({"mid_block_type": None}, "small", "no mid block"),
    ({"block_out_channels": (16, 32, 32, 64)}, "tiny", "does not fit"),  # innermost widths differ
])
def test_preset_that_does_not_fit(overrides, preset, words):
    with pytest.raises(UserError, match=words):
        prune(meta_unet({**TINY_SD, **overrides}), "blocks", PruneConfig(method="blocks", blocks=BlocksOptions(preset)))


def test_unknown_preset_names_the_choices(tiny_sd_unet):
    with pytest.raises(UserError, match="base, small, tiny"):
        prune(tiny_sd_unet, "blocks", PruneConfig(method="blocks", blocks=BlocksOptions("huge")))
