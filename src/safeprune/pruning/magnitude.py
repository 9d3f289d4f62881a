"""`magnitude`: unstructured global magnitude pruning to an L0 budget (seed paper eq. 2,
||theta_pruned||_0 <= R, with R = (1 - ratio) * total parameters; Han et al., NeurIPS 2015).

The `ratio * total` weights of smallest |w| across every Conv2d / Linear weight of the UNet are set to
exactly zero (norms, biases and embeddings are never candidates). The architecture is unchanged, so the
result loads with plain diffusers too; what must survive is the MASK:

  * each masked layer carries a boolean buffer `safeprune_mask` (non-persistent: it moves with
    `.to(device)` but never enters a state dict, so checkpoints stay plain diffusers weights);
  * `reapply_masks(unet)` zeroes the masked weights again and must run after EVERY optimizer step of
    fine-tuning (AdamW moves zero weights through momentum and weight decay); it is a no-op for unmasked
    models, so loops can call it unconditionally;
  * a saved model stores the pruned weights as exact zeros and the plan lists the masked layers, so
    `Magnitude.after_load` re-registers the masks after loading (mask = weight != 0).

The plan keeps the global threshold: replaying it on the same teacher weights gives the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from safeprune.errors import check
from safeprune.pruning.base import Method

MASK = "safeprune_mask"  # buffer name on each masked layer


def candidate_layers(unet) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every Conv2d / Linear: the weights global magnitude pruning may zero."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def register_masks(unet, masks: dict[str, torch.Tensor]) -> None:
    """Attach {layer name: bool mask (weight shape)} to the layers and zero the weights they mask out."""
    for name, mask in masks.items():
        layer = unet.get_submodule(name)
        check(mask.shape == layer.weight.shape, f"mask for {name} has shape {tuple(mask.shape)}, weight "
                                                f"{tuple(layer.weight.shape)}")
        layer.register_buffer(MASK, mask.to(device=layer.weight.device, dtype=torch.bool), persistent=False)
    reapply_masks(unet)


def sparsity_masks(unet) -> dict[str, torch.Tensor]:
    """{parameter name ('....weight'): bool mask, True = kept}; empty for an unmasked UNet."""
    return {f"{name}.weight": getattr(m, MASK) for name, m in unet.named_modules() if getattr(m, MASK, None) is not None}


@torch.no_grad()
def reapply_masks(unet) -> None:
    """Set every masked-out weight back to exactly zero. Call after each optimizer step; no-op if unmasked."""
    for module in unet.modules():
        mask = getattr(module, MASK, None)
        if mask is not None:
            module.weight.masked_fill_(~mask, 0.0)



def restore_masked_layers(unet, plan: dict) -> None:
    """After loading: re-register masks on the plan's `masked_layers` (zeros an erasure method such as
    ConceptPrune keeps, safeprune.erasure; mask = weight != 0), whatever pruned the model; else a no-op."""
    names = plan.get("masked_layers", [])
    if names:
        register_masks(unet, {name: unet.get_submodule(name).weight != 0 for name in names})

@dataclass(frozen=True)
class Magnitude(Method):
    options: ClassVar[tuple[str, ...]] = ("ratio",)
    report_keys: ClassVar[tuple[str, ...]] = ("ratio", "ratio_of")

    def after_load(self, unet, plan):
        """Re-register the masks from the saved zeros (mask = weight != 0): state dicts carry no masks."""
        masks = {name: unet.get_submodule(name).weight != 0 for name in plan["layers"]}
        zeros = sum(int((~m).sum()) for m in masks.values())
        check(zeros >= plan["zeroed"], f"the weights hold {zeros} zeros but the magnitude plan pruned "
                                       f"{plan['zeroed']}: the fine-tuning loop did not call "
                                       "safeprune.pruning.reapply_masks after each step")
        register_masks(unet, masks)

    def __call__(self, unet, cfg, calib):
        layers = candidate_layers(unet)
        total = sum(p.numel() for p in unet.parameters())
        n_zero = round(cfg.ratio * total)
        candidates = sum(m.weight.numel() for _, m in layers)
        check(n_zero <= candidates, f"ratio {cfg.ratio} is out of reach for `magnitude`: only {candidates / total:.1%} "
                                    "of the parameters are conv/linear weights; lower --ratio")
        plan = {"ratio": cfg.ratio, "ratio_of": "total parameters", "layers": [name for name, _ in layers]}
        if next(unet.parameters()).is_meta:  # planning from a config: the budget, but no weights to rank
            return unet, {**plan, "threshold": None, "zeroed": n_zero}
        # The n_zero-th smallest |w| over all candidates is the global threshold; |w| <= it is pruned.
        magnitudes = torch.cat([m.weight.detach().abs().flatten().float() for _, m in layers])
        threshold = float(torch.kthvalue(magnitudes, n_zero).values) if n_zero > 0 else -1.0
        del magnitudes
        return self._mask(unet, layers, plan, threshold)

    def replay(self, unet, plan):
        check("layers" in plan and "threshold" in plan, "magnitude plan lacks 'layers'/'threshold'; re-run prune")
        if next(unet.parameters()).is_meta or plan["threshold"] is None:
            return unet  # architecture only: the masks come back from the saved zeros (after_load)
        layers = [(name, unet.get_submodule(name)) for name in plan["layers"]]
        return self._mask(unet, layers, plan, plan["threshold"])[0]

    @staticmethod
    def _mask(unet, layers, plan, threshold: float):
        masks = {name: m.weight.detach().abs().float() > threshold for name, m in layers}
        register_masks(unet, masks)
        zeroed = sum(int((~mask).sum()) for mask in masks.values())
        return unet, {**plan, "threshold": threshold, "zeroed": zeroed}
