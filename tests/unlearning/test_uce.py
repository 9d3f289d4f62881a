"""UCE: the closed form maps target keys/values onto the anchor's and moves preserved ones no more than it allows."""

import copy

import pytest
import torch
from unlearning_helpers import context

from safeprune.erasure.uce import UCE, closed_form, cross_attention_projections

TARGET, ANCHOR = "a striped red circle", "a red circle"
PRESERVE = ("a checkered red circle", "a plain blue square", "a night green cross")


def _objective(w, w_old, c, v, p, s, lam, r):
    return (s * (c @ w.T - v).square().sum() + lam * ((p @ (w - w_old).T).square().sum())
            + r * (w - w_old).square().sum())


def test_closed_form_is_the_minimiser_and_bounds_the_preserved_change():
    gen = torch.Generator().manual_seed(0)
    w_old = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    c, a, p = (torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (3, 3, 4))
    v = a @ w_old.T
    s, lam, r = 1.0, 0.5, 0.1
    w = closed_form(w_old, c, v, p, s, lam, r)
    # the gradient of the objective vanishes at the closed form (UCE eq. 7 is its normal equation)
    w_var = w.clone().requires_grad_(True)
    _objective(w_var, w_old, c, v, p, s, lam, r).backward()
    assert w_var.grad.abs().max() < 1e-9
    # lambda * preserved change^2 <= objective(W) <= objective(W_old) = s * the targets' residual before the edit
    change = (p @ (w - w_old).T).square().sum()
    assert lam * change <= s * (c @ w_old.T - v).square().sum() + 1e-9
    # 7 tokens in 8 dimensions: the system is consistent, so without a ridge the targets are mapped exactly
    exact = closed_form(w_old, c, v, p, s, lam, 1e-12)
    assert (c @ exact.T - v).abs().max() < 1e-6 and (p @ (exact - w_old).T).abs().max() < 1e-6


def _edit(pipe, unet, **settings):
    ctx = context(pipe, [(TARGET, ANCHOR)])
    uce = UCE(**{"tokens": "last", "ridge": 1e-8, "preserve": PRESERVE, "preserve_derived": False, **settings})
    before = copy.deepcopy(unet)
    report = uce(unet, ctx)
    return ctx, before, report


@pytest.mark.parametrize("student", [None, "channels"])
def test_uce_maps_the_target_onto_the_anchor_in_every_layer(toy_pipe, students, student):
    """On the toy text width (64) one target token and three preserved ones are an exact system: every
    cross-attention key/value of the target equals the anchor's (1e-4) and the preserved ones do not move.
    A channel-pruned student has narrower heads (other output widths) but the same text-side input."""
    from safeprune.models.io import load_unet

    unet = copy.deepcopy(toy_pipe.unet) if student is None else load_unet(students[student])
    ctx, before, report = _edit(toy_pipe, unet)
    emb = ctx.embed([TARGET, ANCHOR, *PRESERVE])
    last = ctx.last_word_index([TARGET, ANCHOR, *PRESERVE])
    tokens = torch.stack([emb[k, last[k]] for k in range(len(last))])  # (5, d)
    old, new = dict(cross_attention_projections(before)), dict(cross_attention_projections(unet))
    assert report["layers"] == len(new) and len(new) > 0
    for name, layer in new.items():
        target_kv, anchor_kv = layer(tokens[0]), old[name](tokens[1])
        assert (target_kv - anchor_kv).abs().max() < 1e-4, name
        assert (layer(tokens[2:]) - old[name](tokens[2:])).abs().max() < 1e-4, name
    if student == "channels":
        teacher = dict(cross_attention_projections(toy_pipe.unet))
        assert any(layer.out_features < teacher[name].out_features for name, layer in new.items())  # pruned heads
    # nothing but to_k / to_v weights changed
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)


def test_uce_with_a_ridge_respects_the_preserve_bound(toy_pipe):
    """The default (tail tokens, ridge 0.5, lambda 1): the preserved keys/values move no more than the closed
    form allows, lambda * ||dW P||^2 <= s * ||W_old C - V*||^2, layer by layer."""
    unet = copy.deepcopy(toy_pipe.unet)
    uce = UCE(tokens="tail", preserve=PRESERVE, preserve_derived=False)
    ctx = context(toy_pipe, [(TARGET, ANCHOR)])
    c, v_tokens, kept = uce.token_pairs(ctx)
    before = dict(cross_attention_projections(copy.deepcopy(unet)))
    uce(unet, ctx)
    for name, layer in cross_attention_projections(unet):
        w_old, w_new = before[name].weight.double(), layer.weight.double()
        residual = (c.double() @ w_old.T - v_tokens.double() @ w_old.T).square().sum()
        change = (kept.double() @ (w_new - w_old).T).square().sum()
        assert uce.lambda_preserve * change <= uce.erase_scale * residual * (1 + 1e-4), name
        after = (c.double() @ w_new.T - v_tokens.double() @ w_old.T).square().sum()
        assert after < residual, name  # and the targets moved toward their anchors


def test_derived_preserve_prompts_swap_the_forbidden_style(toy_pipe):
    ctx = context(toy_pipe, [(TARGET, ANCHOR)])
    prompts = UCE().preserved_prompts(ctx)
    assert prompts[0] == ANCHOR and "a checkered red circle" in prompts and TARGET not in prompts
    assert len(prompts) == 1 + 5  # the anchor, then the five allowed styles
