"""The pieces of the two-optimiser step that DDP / FSDP rely on, in one process (no launcher)."""

import types
from pathlib import Path

import torch
from torch import nn

from safeprune.bilevel.distributed import _by_index, _by_name, _digest, in_sync, optimizer_tensors
from safeprune.models.hooks import canonical_name, capture_features


class Wrapper(nn.Module):
    """Stands in for DDP (`module`) and FSDP (`_fsdp_wrapped_module`): the wrapped module is an attribute."""

    def __init__(self, inner: nn.Module, attr: str):
        super().__init__()
        self.attr = attr
        setattr(self, attr, inner)

    def forward(self, x):
        return getattr(self, self.attr)(x)


def test_canonical_names_drop_wrapper_segments():
    assert canonical_name("module.down_blocks.0") == "down_blocks.0"
    assert canonical_name("_fsdp_wrapped_module.up_blocks.1._fsdp_wrapped_module.resnets.0") == "up_blocks.1.resnets.0"
    assert canonical_name("mid_block._checkpoint_wrapped_module.attentions.0") == "mid_block.attentions.0"
    assert canonical_name("down_blocks.0.module_x") == "down_blocks.0.module_x"  # only whole segments


def test_features_are_captured_through_wrappers():
    unet = nn.Module()
    unet.down_blocks = nn.ModuleList([Wrapper(nn.Linear(3, 3), "_fsdp_wrapped_module")])
    unet.forward = lambda x: unet.down_blocks[0](x)
    wrapped = Wrapper(Wrapper(unet, "_fsdp_wrapped_module"), "module")  # DDP-like around FSDP-like
    x = torch.randn(2, 3)
    with capture_features(wrapped, ["down_blocks.0"]) as feats:
        out = wrapped(x)
    torch.testing.assert_close(feats["down_blocks.0"], out)
    assert all(not m._forward_hooks for m in wrapped.modules())  # removed on exit


def _two_optimizers():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lower = torch.optim.AdamW(net.parameters(), lr=1e-2)
    upper = torch.optim.AdamW(net[1].parameters(), lr=1e-2)
    for opt in (lower, upper):
        net(torch.randn(3, 4)).square().mean().backward()
        opt.step()
        net.zero_grad()
    return net, lower, upper


def test_optimizer_digest_covers_both_moments_of_every_parameter():
    net, lower, upper = _two_optimizers()
    tensors = optimizer_tensors(lower) + optimizer_tensors(upper)
    assert len(tensors) == 3 * (4 + 2)  # (exp_avg, exp_avg_sq, step) x (lower: 4 tensors, upper: 2)
    digest = _digest(tensors)
    assert digest.dtype == torch.int64 and digest == _digest([t.clone() for t in tensors])
    moment = upper.state[net[1].weight]["exp_avg_sq"]
    moment[0, 0] = torch.nextafter(moment[0, 0], torch.tensor(1.0))  # one upper-optimiser moment, one ulp away
    assert _digest(optimizer_tensors(lower) + optimizer_tensors(upper)) != digest


def test_one_process_is_in_sync():
    accelerator = types.SimpleNamespace(num_processes=1)
    assert in_sync(accelerator, [torch.ones(2)]) is True


def test_index_and_name_keyed_optimizer_states_round_trip():
    net, _, upper = _two_optimizers()
    wrapped = Wrapper(net, "_fsdp_wrapped_module")  # parameter names as FSDP v1 shows them
    by_name = {"state": {"1.weight": {"step": 1}, "1.bias": {"step": 2}},
               "param_groups": [{"lr": 1e-2, "params": ["1.weight", "1.bias"]}]}
    by_index = _by_index(by_name)
    assert by_index == {"state": {0: {"step": 1}, 1: {"step": 2}}, "param_groups": [{"lr": 1e-2, "params": [0, 1]}]}
    assert by_index["param_groups"] == [{**g, "params": [0, 1]} for g in by_name["param_groups"]]
    assert _by_name(by_index, upper, wrapped) == by_name
    assert upper.state_dict()["param_groups"][0]["params"] == [0, 1]  # torch numbers the same way


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[2] / "src" / "safeprune" / "configs" / "accelerate"
    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert set(configs) >= {"ddp_4gpu", "fsdp_4gpu", "cpu_2proc"}
    assert configs["ddp_4gpu"].num_processes == 4 and configs["cpu_2proc"].num_processes == 2
    fsdp = configs["fsdp_4gpu"].fsdp_config
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_use_orig_params"] is True  # two optimisers over one set


def test_fp16_clipping_unscales_shared_gradients_once(monkeypatch):
    """Lower and upper optimisers share parameters: clipping before the lower step must unscale each
    gradient once (accelerate's clip_grad_norm_ unscales through every prepared optimiser)."""
    from accelerate import Accelerator

    from safeprune.bilevel.distributed import clip_grad_norm_
    from safeprune.recipes.finetune import _forget_accelerate_settings

    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(3, 4)
    try:
        accelerator = Accelerator(cpu=True)
        # fp16 loss scaling as on a GPU (Accelerate only builds a scaler there): a CPU GradScaler
        monkeypatch.setattr(type(accelerator), "mixed_precision", property(lambda self: "fp16"))
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)
        lower = torch.optim.AdamW(net.parameters(), lr=1e-2)
        upper = torch.optim.AdamW(net[1].parameters(), lr=1e-2)  # a subset, as the unlearning loss selects
        net, lower, upper = accelerator.prepare(net, lower, upper)
        accelerator.backward(net(x).square().mean())  # gradients x 1024
        true_grads = [p.grad / 1024.0 for p in net.parameters()]
        clip_grad_norm_(accelerator, list(net.parameters()), 1e6, optimizer=lower)  # a norm that never clips
        for got, want in zip((p.grad for p in net.parameters()), true_grads):
            torch.testing.assert_close(got, want)
    finally:
        _forget_accelerate_settings()
