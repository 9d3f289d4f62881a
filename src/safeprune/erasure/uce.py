"""`uce`: Unified Concept Editing (Gandikota et al., WACV 2024), the closed-form cross-attention edit.

Every cross-attention key and value projection W (diffusers `attn2.to_k` / `attn2.to_v`: text width d ->
the block's inner width, which head pruning may have narrowed) is replaced by the minimiser of

  s sum_{i in E} ||W c_i - v*_i||^2 + lambda sum_{j in P} ||W c_j - W_old c_j||^2 + r ||W - W_old||_F^2,

E = token embeddings c_i of the target prompts, v*_i = W_old c'_i the same layer's output for the aligned
token of the target's anchor prompt; P = token embeddings of preserved prompts. Setting the gradient to zero
gives UCE eq. 7 (with the ridge term r of the authors' code, `lamb`):

  W = (r W_old + s sum_E v*_i c_i^T + lambda sum_P W_old c_j c_j^T) (r I + s sum_E c_i c_i^T + lambda sum_P c_j c_j^T)^-1.

Which tokens (`tokens`): `tail` = the prompt's last word token and every token after it, the target's and the
anchor's aligned from their last words (the 2023 release, train_erase.py: with a causal text encoder these
positions carry the whole prompt); `last` = the last word token only (the authors' later uce_sd_erase.py).
The solve runs in float64; only the edited weights change (biases, if any, are kept). Seconds, no training.
On a magnitude-pruned student the recipe re-applies the pruning masks afterwards (a projection of the
unconstrained minimiser: the masked entries go back to zero).

Families (safeprune.backbones): SDXL's `attn2.to_k` / `to_v` read the prompt embeddings exactly as SD's do
(both CLIPs' penultimate states, concatenated), so c_i are those. An MMDiT (SD3, Flux) has no cross-attention:
image tokens attend to keys and values of the TEXT STREAM, `attn.add_k_proj` / `add_v_proj` of every joint
block, whose input at block b is the text tokens after the earlier blocks, normalised and modulated by the
timestep. Those inputs are collected with forward hooks on a short guided sampling run of the family's own
sampler per prompt group (targets, anchors, preserved; prompt k of each group from the same seeded x_T) and
AVERAGED OVER ITS `stream_steps` STEPS (default 4, at sample.guidance and sample.resolution). Eq. 7 is then
solved per layer on that layer's own c_i, c'_i, c_j: it is the exact minimiser for those averaged inputs, not
for every timestep's (the text stream depends on t and x_t; the edit maps the average target input onto the
average anchor input). Token positions are the prompt's own: CLIP's tokens lead SD3's sequence, Flux's
sequence is T5's. Flux's single-stream blocks have no text-only projections (one to_k / to_v over the joint
[text; image] sequence): editing those would move the image tokens' keys too, so they are left alone, and
only the double blocks' text keys/values (and through them the text stream the single blocks receive) change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.errors import UserError, check
from safeprune.utils import torch_rng


def cross_attention_projections(unet, edit_keys: bool = True) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of every value (and key) projection of the attention that reads the text: UNet `attn2.to_v`
    / `to_k`, MMDiT `attn.add_v_proj` / `add_k_proj` (safeprune.backbones.is_cross_attention)."""
    from safeprune.backbones import is_cross_attention

    ends = ("to_v", "add_v_proj", "to_k", "add_k_proj") if edit_keys else ("to_v", "add_v_proj")
    return [(n, m) for n, m in unet.named_modules()
            if n.rsplit(".", 1)[-1] in ends and is_cross_attention(f"{n}.weight") and isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def text_stream_inputs(ctx, model, layers, groups: list[list[str]], steps: int) -> list[dict[str, torch.Tensor]]:
    """Per prompt group, {layer name: (P, L, d) inputs} of each layer: the text stream at its block, averaged over
    the `steps` steps of a `steps`-step guided run of the family's sampler (sample.guidance) from x_T seeded by
    (seed, "uce", k) for the group's prompt k, so a target and its anchor (same k) share their start."""
    from safeprune.erasure.sampling import erasure_latent_shape, guided_run, start_noise

    backbone, shape, null = ctx.backbone, erasure_latent_shape(ctx), ctx.embed([""])
    out = []
    for prompts in groups:
        emb, n = ctx.embed(prompts), len(prompts)
        sums: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(module, args):  # the conditional rows come last in the batch ([null; prompts] or prompts)
                x = args[0][-n:].float()
                sums[name] = sums[name] + x if name in sums else x.clone()
            return record

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
        try:
            scheduler = backbone.sampling_scheduler(ctx.pipe.scheduler, model, steps, shape)
            x = start_noise((n, *shape), [torch_rng(ctx.cfg.seed, "uce", k) for k in range(n)], scheduler, ctx.device)
            guided_run(backbone, model, scheduler, x, emb, null, ctx.cfg.sample.guidance, steps)
        finally:
            for h in handles:
                h.remove()
        out.append({name: total / steps for name, total in sums.items()})
    return out


def closed_form(w_old: torch.Tensor, targets: torch.Tensor, values: torch.Tensor, preserve: torch.Tensor,
                erase_scale: float, lambda_preserve: float, ridge: float) -> torch.Tensor:
    """UCE eq. 7 for one layer: w_old (O, d), targets c_i (N, d), values v*_i (N, O), preserve c_j (M, d)."""
    w = w_old.double()
    c, v, p = targets.double(), values.double(), preserve.double()
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    rhs = ridge * w + erase_scale * v.T @ c + lambda_preserve * (w @ p.T) @ p  # (O, d)
    gram = ridge * eye + erase_scale * c.T @ c + lambda_preserve * p.T @ p  # (d, d), symmetric
    try:
        return torch.linalg.solve(gram, rhs.T).T  # rhs @ gram^-1, as gram is symmetric
    except RuntimeError as err:  # torch.linalg.LinAlgError: singular without a ridge
        raise UserError("UCE's system is singular (too few target/preserve tokens for the text width); "
                        "set unlearn.uce.ridge > 0") from err


@dataclass(frozen=True)
class UCE:
    erase_scale: float = 1.0  # s
    lambda_preserve: float = 1.0  # lambda
    ridge: float = 0.5  # r
    tokens: str = "tail"  # tail | last (see the module doc)
    preserve: tuple[str, ...] = ()  # explicit preserved prompts
    preserve_derived: bool = True  # + anchors and targets with the concept swapped for an allowed value
    edit_keys: bool = True
    stream_steps: int = 4  # MMDiT: sampling steps the text-stream inputs are averaged over (text_stream_inputs)

    @classmethod
    def from_config(cls, cfg) -> UCE:
        """Settings from the run config's `unlearn.uce` section."""
        c = cfg.unlearn.uce
        return cls(c.erase_scale, c.lambda_preserve, c.ridge, c.tokens, tuple(c.preserve), c.preserve_derived,
                   c.edit_keys, c.stream_steps)

    def preserved_prompts(self, ctx) -> list[str]:
        from safeprune.erasure import swapped_prompts

        prompts = list(self.preserve)
        if self.preserve_derived:
            for concept in ctx.concepts:
                prompts += [concept.anchor] if concept.anchor else []
                prompts += swapped_prompts(concept.target, ctx.world.forbidden, ctx.world.allowed)
        targets = {c.target for c in ctx.concepts}
        return [p for p in dict.fromkeys(prompts) if p not in targets]

    def token_pairs(self, ctx, tables=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target tokens (N, d), aligned anchor tokens (N, d), preserved tokens (M, d)) of the text the projections
        read: `tables` = (targets, anchors, preserved) per-token inputs (P, L, d) of one layer (an MMDiT's text
        stream), default the prompt embeddings (what a UNet's cross-attention reads)."""
        targets, anchors = [c.target for c in ctx.concepts], [c.anchor for c in ctx.concepts]
        preserve = self.preserved_prompts(ctx)
        if tables is None:
            tables = [_hidden(ctx.embed(targets)), _hidden(ctx.embed(anchors)),
                      _hidden(ctx.embed(preserve)) if preserve else None]  # (P, L, d)
        emb_t, emb_a, emb_p = tables
        last_t, last_a = ctx.last_word_index(targets), ctx.last_word_index(anchors)
        length = emb_t.shape[1]
        c, v = [], []
        for k in range(len(targets)):
            if self.tokens == "last":
                c.append(emb_t[k, last_t[k]][None])
                v.append(emb_a[k, last_a[k]][None])
                continue
            span = length - max(last_t[k], last_a[k])  # tokens from each last word on, cut to a common length
            c.append(emb_t[k, last_t[k]:last_t[k] + span])
            v.append(emb_a[k, last_a[k]:last_a[k] + span])
        kept = torch.zeros(0, emb_t.shape[2], device=emb_t.device)
        if preserve:
            last_p = ctx.last_word_index(preserve)
            kept = torch.cat([emb_p[k, last_p[k]:last_p[k] + 1] if self.tokens == "last" else emb_p[k, last_p[k]:]
                              for k in range(len(preserve))])
        return torch.cat(c), torch.cat(v), kept

    @torch.no_grad()
    def __call__(self, unet, ctx) -> dict:
        from safeprune.erasure import check_concepts

        check_concepts(ctx.concepts)
        layers = cross_attention_projections(unet, self.edit_keys)
        check(bool(layers), "the model has no cross-attention key/value projections for UCE to edit (attn2.to_k / "
                            "to_v, add_k_proj / add_v_proj); choose another --method")
        if ctx.backbone.text_stream:  # each block's projections read that block's text stream: its own inputs
            groups = [[c.target for c in ctx.concepts], [c.anchor for c in ctx.concepts], self.preserved_prompts(ctx)]
            was_training = unet.training
            unet.eval()
            inputs = text_stream_inputs(ctx, unet, layers, [g for g in groups if g], self.stream_steps)
            unet.train(was_training)
            kept_inputs = inputs[2] if groups[2] else {}
            pairs = {n: self.token_pairs(ctx, (inputs[0][n], inputs[1][n], kept_inputs.get(n))) for n, _ in layers}
        else:  # every cross-attention reads the same text: the prompt embeddings (UNets), their projection (PixArt)
            def read(prompts):
                return ctx.backbone.cross_attention_input(unet, _hidden(ctx.embed(prompts)))

            preserve = self.preserved_prompts(ctx)
            shared = self.token_pairs(ctx, (read([c.target for c in ctx.concepts]),
                                            read([c.anchor for c in ctx.concepts]), read(preserve) if preserve else None))
            pairs = {n: shared for n, _ in layers}
        residual_before, residual_after = 0.0, 0.0
        for name, layer in layers:
            c, anchor_tokens, kept = pairs[name]
            w_old = layer.weight.detach()
            values = anchor_tokens.to(w_old) @ w_old.T  # v*_i = W_old c'_i, (N, O)
            check(c.shape[1] == w_old.shape[1], f"UCE: text width {c.shape[1]} does not match the cross-attention "
                                                f"input width {w_old.shape[1]}; pass the model's own pipeline")
            w_new = closed_form(w_old, c, values, kept, self.erase_scale, self.lambda_preserve, self.ridge)
            residual_before += float((c.double() @ w_old.double().T - values.double()).square().sum())
            residual_after += float((c.double() @ w_new.T - values.double()).square().sum())
            layer.weight.copy_(w_new.to(layer.weight.dtype))
        c, _, kept = next(iter(pairs.values()))
        return {"layers": len(layers), "target_tokens": int(c.shape[0]), "preserved_tokens": int(kept.shape[0]),
                "preserved_prompts": len(self.preserved_prompts(ctx)),
                "target_residual_before": residual_before, "target_residual_after": residual_after}


def _hidden(emb) -> torch.Tensor:
    """The per-token states (P, L, d) of a family's prompt embeddings (SDXL: both CLIPs' states, concatenated)."""
    return emb if isinstance(emb, torch.Tensor) else emb.hidden
