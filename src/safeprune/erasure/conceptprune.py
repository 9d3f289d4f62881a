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

Every family (safeprune.backbones), on the FFNs that read image tokens, the ones the concept's appearance
passes through: UNet transformer blocks' `ff.net.2` (SD, SDXL), the image stream's `ff.net.2` of MMDiT joint
blocks (SD3, Flux; `ff_context` transforms the text stream, which UCE and ESD-x edit instead), and the
single-stream blocks' `proj_out` of Flux (most of its FFN width: its MLP columns, scored on the image tokens of
the joint [text; image] sequence; the attention-output columns are left alone). Weights that read FFN
activations are what Wanda scores (a neuron's outgoing weights), so `proj_mlp`, the single blocks' FFN input
layer, is not the one masked. The run is the family's own guided sampler (safeprune.erasure.sampling): DDIM on
SD/SDXL, flow-matching Euler on SD3 and Flux (Flux guided by its guidance embedding, one conditional call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from safeprune.errors import check
from safeprune.utils import torch_rng

BATCH = 64  # prompts per sampling batch (does not change any score: sums of squares are order-free)
SINGLE_BLOCK_OUT = re.compile(r"single_transformer_blocks\.\d+\.proj_out")  # Flux single-stream blocks


def ffn_output_layers(model) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of every feed-forward output projection that reads image tokens' FFN activations: `...ff.net.2`
    (UNet transformer blocks; the image stream of MMDiT joint blocks, not `ff_context`, the text stream's) and
    the `proj_out` of Flux's single-stream blocks (its input is [attention output; MLP activations])."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (n.endswith("ff.net.2") or SINGLE_BLOCK_OUT.fullmatch(n))]


def neuron_start(model, name: str, layer: torch.nn.Linear) -> int:
    """The first input column of `layer` that is an FFN neuron: 0, or after a single block's attention output."""
    if not SINGLE_BLOCK_OUT.fullmatch(name):
        return 0
    return layer.in_features - model.get_submodule(name.rsplit(".", 1)[0]).proj_mlp.out_features


@torch.no_grad()
def activation_norms(backbone, pipe, model, cond, uncond, *, shape: tuple[int, ...], sample_steps: int,
                     timesteps: int, guidance: float, seed: int, layers) -> list[list[torch.Tensor]]:
    """norms[t][l] = (neurons,) column norms of layer l's row-normalised FFN activations at the first `timesteps`
    steps of a `sample_steps`-step guided run of the family's sampler (safeprune.erasure.sampling).

    cond: P prompt rows ((P, L, D) or PromptEmbeddings), uncond one row; latents of `shape` (C, h, w); prompt k
    starts from noise seeded by (seed, k), so a target and its anchor (same index in two calls) share their start.
    Only the first `timesteps` steps are run. Flux single blocks count their image tokens only (the joint
    sequence is [text; image]), as every other layer here reads image tokens alone.
    """
    from safeprune.erasure.sampling import guided_run, start_noise

    starts = [neuron_start(model, n, m) for n, m in layers]
    sums = [[torch.zeros(m.in_features - s, dtype=torch.float64) for (_, m), s in zip(layers, starts)]
            for _ in range(timesteps)]
    step = {"t": 0}
    text_tokens = cond.shape[1]

    def hook(index, name):
        skip = text_tokens if SINGLE_BLOCK_OUT.fullmatch(name) else 0

        def record(module, args):
            x = args[0][:, skip:, starts[index]:] if skip else args[0][..., starts[index]:]
            x = x.reshape(-1, x.shape[-1]).float()
            x = torch.nn.functional.normalize(x, dim=1)  # per token, as the authors (avoids overflow)
            sums[step["t"]][index] += x.square().sum(0).double().cpu()
        return record

    handles = [m.register_forward_pre_hook(hook(i, n)) for i, (n, m) in enumerate(layers)]
    try:
        for start in range(0, len(cond), BATCH):
            emb = cond[start:start + BATCH]
            n = len(emb)
            # fresh: samplers count steps
            scheduler = backbone.sampling_scheduler(pipe.scheduler, model, sample_steps, shape)
            x = start_noise((n, *shape), [torch_rng(seed, "conceptprune", start + k) for k in range(n)],
                            scheduler, cond.device)
            guided_run(backbone, model, scheduler, x, emb, uncond, guidance, timesteps,
                       on_step=lambda k: step.update(t=k))
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
        from safeprune.erasure import check_concepts
        from safeprune.erasure.sampling import erasure_latent_shape
        from safeprune.pruning.magnitude import MASK, register_masks

        check_concepts(ctx.concepts)
        layers = ffn_output_layers(unet)
        check(bool(layers), "the model has no feed-forward layers that read image tokens (ff.net.2; Flux single "
                            "blocks' proj_out) for ConceptPrune to prune; choose another --method")
        was_training = unet.training
        unet.eval()
        null = ctx.embed([""])
        kwargs = dict(shape=erasure_latent_shape(ctx), sample_steps=self.sample_steps, timesteps=self.timesteps,
                      guidance=self.guidance, seed=ctx.cfg.seed, layers=layers)
        run = (ctx.backbone, ctx.pipe, unet)
        target = activation_norms(*run, ctx.embed([c.target for c in ctx.concepts]), null, **kwargs)
        base = activation_norms(*run, ctx.embed([c.anchor for c in ctx.concepts]), null, **kwargs)
        masks, zeroed, total = {}, 0, 0
        for index, (name, layer) in enumerate(layers):
            start = neuron_start(unet, name, layer)  # only FFN neurons' columns are scored (and may go)
            union = torch.zeros_like(layer.weight, dtype=torch.bool, device="cpu")
            for t in range(self.timesteps):
                union[:, start:] |= skilled_mask(layer.weight[:, start:], target[t][index], base[t][index],
                                                 self.sparsity)
            union = union.to(layer.weight.device)
            kept = getattr(layer, MASK, None)
            kept = (kept if kept is not None else torch.ones_like(union)) & ~union
            masks[name] = kept
            zeroed += int(union.sum())
            total += union[:, start:].numel()
        register_masks(unet, masks)
        unet.train(was_training)
        return {"layers": len(layers), "zeroed": zeroed, "zeroed_share_of_ffn": zeroed / max(total, 1),
                "masked_layers": sorted(masks)}
