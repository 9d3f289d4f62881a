"""`channels`: identity at ratio 0, the target ratio, legal widths, untouched block widths, replay, taylor."""

import copy

import pytest
import torch
from pruning_helpers import meta_unet, run_unet, sd_config, unet_inputs

from safeprune.config import ChannelsOptions, PruneConfig
from safeprune.errors import UserError
from safeprune.models.hooks import capture_features, feature_blocks
from safeprune.pruning import apply_plan, prune
from safeprune.pruning.channels import find_sites
from safeprune.pruning.measure import count_parameters


def channels(ratio, options=None):
    return PruneConfig(method="channels", ratio=ratio, channels=options or ChannelsOptions())


@pytest.fixture(scope="module")
def toy_half(toy_unet):
    return prune(toy_unet, "channels", channels(0.5))


def test_ratio_zero_is_an_exact_identity(toy_unet):
    inputs = unet_inputs(toy_unet)
    student, plan = prune(toy_unet, "channels", channels(0.0))
    assert plan["groups"] == [] and count_parameters(student) == count_parameters(toy_unet)
    assert torch.equal(run_unet(student, inputs), run_unet(toy_unet, inputs))


def test_ratio_is_a_share_of_total_parameters(toy_unet, toy_half):
    student, plan = toy_half
    removed = 1 - count_parameters(student) / count_parameters(toy_unet)
    assert plan["ratio_of"] == "total parameters" and removed == pytest.approx(0.5, abs=0.03)


def test_input_model_is_not_modified(toy_unet, toy_half):
    assert toy_unet.down_blocks[1].resnets[0].conv1.out_channels == 64


def test_widths_stay_whole_groups_and_heads(toy_unet, toy_half):
    student, _ = toy_half
    teacher_sites = {name: block for name, _, block in find_sites(toy_unet)}
    kinds = set()
    for name, kind, block in find_sites(student):
        old = teacher_sites[name]
        if kind.name == "resnet":  # the group SIZE is kept, so kept groups normalise exactly as before
            assert block.norm2.num_channels % block.norm2.num_groups == 0
            assert block.norm2.num_channels // block.norm2.num_groups == old.norm2.num_channels // old.norm2.num_groups
            assert block.conv1.out_channels % 16 == 0  # channel_multiple: SIMD-aligned widths
        elif kind.name == "heads":
            assert block.to_q.out_features == block.heads * (old.to_q.out_features // old.heads)
            assert block.to_k.out_features == block.to_v.out_features == block.to_out[0].in_features == block.inner_dim
        else:
            assert block.net[2].in_features % 16 == 0 and block.net[0].proj.out_features == 2 * block.net[2].in_features
        if kind.width(block) < kind.width(old):
            kinds.add(kind.name)
    assert kinds == {"resnet", "heads", "ffn"}  # every kind of site was actually pruned at 0.5


def test_block_widths_kept_for_feature_distillation(toy_unet, toy_half):
    student, _ = toy_half
    inputs = unet_inputs(toy_unet)
    names = feature_blocks(toy_unet)
    with torch.no_grad(), capture_features(toy_unet, names) as t_feats:
        t_out = toy_unet(**inputs).sample
    with torch.no_grad(), capture_features(student, names) as s_feats:
        s_out = student(**inputs).sample
    assert s_out.shape == t_out.shape
    assert all(s_feats[n].shape == t_feats[n].shape for n in names)


def test_plan_replays_on_a_fresh_base(toy_unet, toy_half):
    student, plan = toy_half
    inputs = unet_inputs(toy_unet)
    replayed = apply_plan(toy_unet, plan)
    assert torch.equal(run_unet(replayed, inputs), run_unet(student, inputs))


def test_importance_keeps_the_strongest_units(toy_unet):
    # Scale up the weights of the LAST GroupNorm group of one ResNet: magnitude importance must keep it.
    boosted = copy.deepcopy(toy_unet)
    block = boosted.down_blocks[1].resnets[0]
    unit = block.conv1.out_channels // block.norm2.num_groups
    with torch.no_grad():
        block.conv1.weight[-unit:] *= 100
    _, plan = prune(boosted, "channels", channels(0.5))
    entry = next(g for g in plan["groups"] if g["block"] == "down_blocks.1.resnets.0")
    assert entry["unit"] % unit == 0
    assert block.conv1.out_channels // entry["unit"] - 1 not in entry["pruned_units"]  # the boosted last unit stays


def test_taylor_uses_the_calibration_loss(tiny_sd_unet):
    calls = []

    def calib(unet, i):
        calls.append(i)
        inputs = unet_inputs(unet, seed=i)
        return unet(**inputs).sample.pow(2).mean()

    student, plan = prune(tiny_sd_unet, "channels", channels(0.3, ChannelsOptions(importance="taylor", calibration_batches=2)), calib)
    _, magnitude_plan = prune(tiny_sd_unet, "channels", channels(0.3))
    assert calls == [0, 1] and plan["importance"] == "taylor"
    assert plan["groups"] != magnitude_plan["groups"]  # a different criterion picks different units
    assert all(p.grad is None for p in student.parameters())
    assert run_unet(student, unet_inputs(tiny_sd_unet)).shape == (2, 4, 16, 16)


def test_taylor_without_calibration_is_a_user_error(tiny_sd_unet):
    with pytest.raises(UserError, match="calib"):
        prune(tiny_sd_unet, "channels", channels(0.3, ChannelsOptions(importance="taylor")))


def test_unreachable_ratio_is_a_user_error(tiny_sd_unet):
    with pytest.raises(UserError, match="out of reach"):
        prune(tiny_sd_unet, "channels", channels(0.95))


def test_sd15_plan_on_the_meta_device():
    teacher = meta_unet(sd_config("sd15"))
    student, plan = prune(teacher, "channels", channels(0.5))
    assert count_parameters(student) / count_parameters(teacher) == pytest.approx(0.5, abs=0.01)
    assert plan["importance"].startswith("positional") and next(student.parameters()).is_meta
    attention = [b for _, k, b in find_sites(student) if k.name == "heads"]
    # SD 1.x has 8 heads everywhere: about the same share goes from each (one unit of top-up at most),
    # and head_dim (width / 8) stays.
    heads = {b.heads for b in attention}
    assert max(heads) < 8 and max(heads) - min(heads) <= 1
    assert {b.to_q.out_features // b.heads for b in attention} == {40, 80, 160}
