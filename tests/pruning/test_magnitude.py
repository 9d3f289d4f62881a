"""`magnitude`: the L0 budget (eq. 2), masks that survive optimizer steps and saving, exact identity at 0."""

import copy

import pytest
import torch
from pruning_helpers import meta_unet, run_unet, sd_config, unet_inputs

from safeprune.config import PruneConfig
from safeprune.errors import UserError
from safeprune.models.io import load_unet, save_unet
from safeprune.pruning import apply_plan, prune, reapply_masks, sparsity_masks
from safeprune.pruning.measure import count_nonzero, count_parameters


def magnitude(ratio):
    return PruneConfig(method="magnitude", ratio=ratio)


@pytest.fixture(scope="module")
def toy_sparse(toy_unet):
    return prune(toy_unet, "magnitude", magnitude(0.4))


def test_l0_budget_of_total_parameters(toy_unet, toy_sparse):
    student, plan = toy_sparse
    total = count_parameters(toy_unet)
    assert count_parameters(student) == total  # unstructured: same architecture, zeros stored
    masked_out = sum(int((~m).sum()) for m in sparsity_masks(student).values())
    assert masked_out == plan["zeroed"] == pytest.approx(0.4 * total, abs=2)  # ties at the threshold only
    assert count_nonzero(student) <= total - plan["zeroed"]  # (zero-initialised biases count as zeros too)


def test_smallest_weights_go(toy_unet, toy_sparse):
    student, plan = toy_sparse
    kept = student.down_blocks[0].resnets[0].conv1.weight
    original = toy_unet.down_blocks[0].resnets[0].conv1.weight
    assert torch.all(original[kept == 0].abs() <= plan["threshold"])
    assert torch.all(original[kept != 0].abs() > plan["threshold"])


def test_ratio_zero_is_an_exact_identity(tiny_sd_unet):
    student, plan = prune(tiny_sd_unet, "magnitude", magnitude(0.0))
    inputs = unet_inputs(tiny_sd_unet)
    assert plan["zeroed"] == 0 and torch.equal(run_unet(student, inputs), run_unet(tiny_sd_unet, inputs))


def test_masks_survive_an_optimizer_step(toy_sparse):
    student, _ = toy_sparse
    student = copy.deepcopy(student).train()
    zeros = {name: (p == 0).clone() for name, p in student.named_parameters() if name in sparsity_masks(student)}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student(**unet_inputs(student)).sample.square().mean().backward()
    opt.step()
    assert any(bool((student.get_parameter(n)[z] != 0).any()) for n, z in zeros.items())  # AdamW moved them
    reapply_masks(student)
    assert all(bool((student.get_parameter(n)[z] == 0).all()) for n, z in zeros.items())


def test_reapply_is_a_noop_without_masks(tiny_sd_unet):
    before = {k: v.clone() for k, v in tiny_sd_unet.state_dict().items()}
    reapply_masks(tiny_sd_unet)
    assert sparsity_masks(tiny_sd_unet) == {}
    assert all(torch.equal(before[k], v) for k, v in tiny_sd_unet.state_dict().items())


def test_save_load_restores_masks(tmp_path, toy_sparse):
    student, plan = toy_sparse
    save_unet(student, tmp_path / "m", plan)
    loaded = load_unet(tmp_path / "m")
    masks, loaded_masks = sparsity_masks(student), sparsity_masks(loaded)
    assert masks.keys() == loaded_masks.keys() and all(torch.equal(masks[k], loaded_masks[k]) for k in masks)
    assert "safeprune_mask" not in " ".join(loaded.state_dict())  # masks never enter checkpoints
    inputs = unet_inputs(student)
    assert torch.equal(run_unet(loaded, inputs), run_unet(student, inputs))


def test_replay_rebuilds_the_same_masks(toy_unet, toy_sparse):
    student, plan = toy_sparse
    replayed = apply_plan(toy_unet, plan)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), replayed.state_dict().values()))


def test_load_refuses_weights_that_lost_their_zeros(tmp_path, toy_sparse):
    student, plan = toy_sparse
    dense = copy.deepcopy(student)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(1e-3)  # a fine-tuning loop that forgot reapply_masks
    save_unet(dense, tmp_path / "m", plan)
    with pytest.raises(UserError, match="reapply_masks"):
        load_unet(tmp_path / "m")


def test_sd15_budget_on_the_meta_device():
    teacher = meta_unet(sd_config("sd15"))
    _, plan = prune(teacher, "magnitude", magnitude(0.5))
    assert plan["zeroed"] == round(0.5 * count_parameters(teacher)) and plan["threshold"] is None
