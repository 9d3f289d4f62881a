"""ESD as published: self-sampled x_t are a pure function of the seed; ESD-x moves only cross-attention."""

import copy

import torch
from unlearning_helpers import context

from safeprune.erasure.esd_paper import ESDPaper, sample_xt


def test_self_sampled_xt_are_deterministic_under_a_seed(toy_pipe):
    from diffusers import DDIMScheduler

    ctx = context(toy_pipe, [("a striped red circle", "a red circle")])
    sched = DDIMScheduler.from_config(toy_pipe.scheduler.config)
    sched.set_timesteps(6)
    emb, null = ctx.embed(["a striped red circle"] * 2), ctx.embed([""])

    def draw(seed, stop=3):
        return sample_xt(toy_pipe.unet, sched, emb, null, stop, 3.0, torch.Generator().manual_seed(seed))

    (a, t_a), (b, t_b), (c, _) = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and torch.equal(t_a, t_b) and not torch.allclose(a, c)
    assert int(t_a[0]) == int(sched.timesteps[3])  # x_t sits at the timestep its last DDIM step reached
    x0, t0 = draw(0, stop=0)
    assert int(t0[0]) == int(sched.timesteps[0]) and not torch.allclose(x0, a)  # stop 0 = the start noise


def _changed(before, after):
    return [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]


def test_esd_x_moves_only_cross_attention_and_esd_u_everything_else(toy_pipe):
    ctx = context(toy_pipe, [("a striped red circle", "")])
    runs = {}
    for params in ("xattn", "noxattn"):
        unet = copy.deepcopy(toy_pipe.unet)
        report = ESDPaper(steps=2, lr=1e-3, params=params, sample_steps=4)(unet, ctx)
        runs[params] = _changed(toy_pipe.unet, unet)
        assert report["counts"]["student_bwd"] == 2 and report["loss_first"] > 0
    assert runs["xattn"] and all(".attn2." in k for k in runs["xattn"])
    assert runs["noxattn"] and not any(".attn2." in k or k.startswith(("conv_out", "time_embedding"))
                                       for k in runs["noxattn"])


def test_a_run_is_a_pure_function_of_the_seed(toy_pipe):
    ctx = context(toy_pipe, [("a striped red circle", "")])
    a, b = copy.deepcopy(toy_pipe.unet), copy.deepcopy(toy_pipe.unet)
    ESDPaper(steps=2, lr=1e-3, sample_steps=4)(a, ctx)
    ESDPaper(steps=2, lr=1e-3, sample_steps=4)(b, ctx)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
