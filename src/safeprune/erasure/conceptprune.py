"""`conceptprune`: ConceptPrune (Chavhan et al., 2024), training-free erasure by pruning skilled FFN weights.

Following the authors' wanda.py / save_union_over_time.py: every transformer block's feed-forward output
layer W (diffusers `ff.net.2`, (out, inner)) is scored Wanda-style (Sun et al., ICLR 2024),

  S_t[o, i] = |W[o, i]| * ||X_t[:, i]||_2,

X_t = the layer's inputs (GEGLU outputs) at denoising step t of a classifier-free-guided DDIM run, each
token's row L2-normalised, stacked over tokens, both guidance halves and every prompt. For step t a weight
is *skilled* if it is among the top `sparsity` share of its row under the concept prompts' scores AND scores
higher for the concept prompts than for their anchors (the authors' "base" prompts, same seed). The union over
the first `timesteps` steps is set to exactly zero (the authors' select_ratio 0).

The zeros are kept as masks (safeprune.pruning.magnitude): the saved plan lists the layers under
`masked_layers`, so `load_unet` re-registers them and every later fine-tuning step re-applies them, as for a
magnitude-pruned student; on such a student the union is added to its existing mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprune.errors import check
from safeprune.utils import torch_rng

BATCH = 64  # prompts per sampling batch (does not change any score: sums of squares are order-free)


def ffn_output_layers(unet) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of every transformer feed-forward output projection (`...ff.net.2`)."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith("ff.net.2") and isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def activation_norms(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, *, sample_steps: int,
                     timesteps: int, guidance: float, seed: int, layers) -> list[list[torch.Tensor]]:
    """norms[t][l] = (inner,) column norms of layer l's row-normalised inputs at the first `timesteps` DDIM steps.

    cond (P, L, D) text embeddings; prompt k starts from noise seeded by (seed, k), so a target and its anchor
    (same index in two calls) share their start. Only the first `timesteps` steps are run.
    """
    sums = [[torch.zeros(m.in_features, dtype=torch.float64) for _, m in layers] for _ in range(timesteps)]
    step = {"t": 0}

    def hook(index):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            x = torch.nn.functional.normalize(x, dim=1)  # per token, as the authors (avoids overflow)
            sums[step["t"]][index] += x.square().sum(0).double().cpu()
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    cfg = unet.config
    device = cond.device
    try:
        scheduler.set_timesteps(sample_steps)
        for start in range(0, len(cond), BATCH):
            emb = cond[start:start + BATCH]
            n = len(emb)
            x = torch.cat([torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                                       generator=torch_rng(seed, "conceptprune", start + k))
                           for k in range(n)]).to(device) * scheduler.init_noise_sigma
            context = torch.cat([uncond.expand(n, -1, -1), emb])
            for t_index, t in enumerate(scheduler.timesteps[:timesteps]):
                step["t"] = t_index
                inp = scheduler.scale_model_input(torch.cat([x, x]), t)
                eps_u, eps_c = unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
                x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    finally:
        for h in handles:
            h.remove()
    return [[s.sqrt().float() for s in per_t] for per_t in sums]


def skilled_mask(weight: torch.Tensor, norm_target: torch.Tensor, norm_base: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool (out, inner): top-`sparsity` per row under the target's Wanda score and above the base's score."""
    w = weight.detach().abs().float().cpu()
    score_t, score_b = w * norm_target, w * norm_base  # (out, inner)
    k = int(sparsity * w.shape[1])
    top = torch.zeros_like(w, dtype=torch.bool)
    if k > 0:
        top.scatter_(1, score_t.topk(k, dim=1).indices, True)
    return top & (score_t > score_b)


@dataclass(frozen=True)
class ConceptPrune:
    sparsity: float = 0.01
    timesteps: int = 10
    sample_steps: int = 50
    guidance: float = 7.5

    @classmethod
    def from_config(cls, cfg) -> ConceptPrune:
        """Settings from the run config's `unlearn.conceptprune` section."""
        c = cfg.unlearn.conceptprune
        return cls(c.sparsity, c.timesteps, c.sample_steps, c.guidance)

    @torch.no_grad()
    def __call__(self, unet, ctx) -> dict:
        from diffusers import DDIMScheduler

        from safeprune.erasure import check_concepts
        from safeprune.pruning.magnitude import MASK, register_masks

        check_concepts(ctx.concepts)
        layers = ffn_output_layers(unet)
        check(bool(layers), "the model has no transformer feed-forward layers (ff.net.2) for ConceptPrune to prune; "
                            "choose another --method")
        was_training = unet.training
        unet.eval()
        scheduler = DDIMScheduler.from_config(ctx.pipe.scheduler.config)
        null = ctx.embed([""])
        kwargs = dict(sample_steps=self.sample_steps, timesteps=self.timesteps, guidance=self.guidance,
                      seed=ctx.cfg.seed, layers=layers)
        target = activation_norms(unet, scheduler, ctx.embed([c.target for c in ctx.concepts]), null, **kwargs)
        base = activation_norms(unet, scheduler, ctx.embed([c.anchor for c in ctx.concepts]), null, **kwargs)
        masks, zeroed, total = {}, 0, 0
        for index, (name, layer) in enumerate(layers):
            union = torch.zeros_like(layer.weight, dtype=torch.bool, device="cpu")
            for t in range(self.timesteps):
                union |= skilled_mask(layer.weight, target[t][index], base[t][index], self.sparsity)
            union = union.to(layer.weight.device)
            kept = getattr(layer, MASK, None)
            kept = (kept if kept is not None else torch.ones_like(union)) & ~union
            masks[name] = kept
            zeroed += int(union.sum())
            total += union.numel()
        register_masks(unet, masks)
        unet.train(was_training)
        return {"layers": len(layers), "zeroed": zeroed, "zeroed_share_of_ffn": zeroed / max(total, 1),
                "masked_layers": sorted(masks)}
