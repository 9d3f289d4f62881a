"""The contract every registered pruning method keeps (one parametrised test per property, over `METHODS`).

A new method in `safeprune.pruning.METHODS` is tested here without a line of new test code: output shape
kept, the input UNet untouched, a saved-and-loaded model computes what the pruned one did, ratio 0 is the
identity where the method has a ratio, and the method's self-description (options, report, saved config)
is consistent with the config and the plan it writes.
"""

import dataclasses
import json

import pytest
import torch
from pruning_helpers import run_unet, unet_inputs

from safeprune.config import PruneConfig
from safeprune.models.io import load_plan, load_unet, save_unet
from safeprune.pruning import METHODS, is_pruned, prune, saved_config

NAMES = sorted(METHODS)
# A setting per method that actually removes something on the tiny UNet (defaults otherwise).
SETTINGS = {"channels": {"ratio": 0.3}, "magnitude": {"ratio": 0.4}}


@pytest.fixture(scope="module")
def pruned(tiny_sd_unet):
    """{name: (pruned UNet, plan)} with each method's setting, computed once."""
    torch.manual_seed(0)
    return {name: prune(tiny_sd_unet, name, PruneConfig(**SETTINGS.get(name, {}))) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_is_kept(name, tiny_sd_unet, pruned):
    inputs = unet_inputs(tiny_sd_unet)
    student, plan = pruned[name]
    assert run_unet(student, inputs).shape == run_unet(tiny_sd_unet, inputs).shape
    assert plan["method"] == name and json.loads(json.dumps(plan)) == plan
    # every method but the identity changes what the model computes at its setting
    changed = not torch.equal(run_unet(student, inputs), run_unet(tiny_sd_unet, inputs))
    assert changed == METHODS[name].prunes == is_pruned(plan)


@pytest.mark.parametrize("name", NAMES)
def test_the_input_unet_is_not_modified(name, tiny_sd_unet):
    before = {k: v.clone() for k, v in tiny_sd_unet.state_dict().items()}
    config = dict(tiny_sd_unet.config)
    prune(tiny_sd_unet, name, PruneConfig(**SETTINGS.get(name, {})))
    after = tiny_sd_unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dict(tiny_sd_unet.config) == config
    assert not any(hasattr(m, "safeprune_mask") for m in tiny_sd_unet.modules())  # magnitude masks the copy only


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_give_the_same_outputs(name, tiny_sd_unet, pruned, tmp_path):
    student, plan = pruned[name]
    folder = save_unet(student, tmp_path / name, plan)
    loaded = load_unet(folder)
    inputs = unet_inputs(tiny_sd_unet, seed=1)
    assert torch.equal(run_unet(loaded, inputs), run_unet(student.eval(), inputs))
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    assert json.loads(json.dumps(saved_config(load_plan(folder)))) == config  # the method chose config.json
    # what loading restores (magnitude: the masks) makes fine-tuning keep the pruned weights at zero
    assert [n for n, m in loaded.named_modules() if hasattr(m, "safeprune_mask")] == \
        [n for n, m in student.named_modules() if hasattr(m, "safeprune_mask")]


@pytest.mark.parametrize("name", [n for n in NAMES if "ratio" in METHODS[n].options])
def test_ratio_zero_is_the_identity(name, tiny_sd_unet):
    student, _ = prune(tiny_sd_unet, name, PruneConfig(ratio=0.0))
    inputs = unet_inputs(tiny_sd_unet, seed=2)
    assert torch.equal(run_unet(student.eval(), inputs), run_unet(tiny_sd_unet, inputs))
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in tiny_sd_unet.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_the_method_describes_itself(name, pruned):
    method, (_, plan) = METHODS[name], pruned[name]
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    assert set(method.options) <= fields, f"{name} names options that PruneConfig lacks"
    assert set(method.report(plan)) == set(method.report_keys) and set(method.report_keys) <= set(plan)
    method.check_config(PruneConfig())  # the defaults are valid for every method
    assert isinstance(method.needs_calibration(PruneConfig()), bool)
