"""The reduction every loss here shares: a squared error averaged over all but the batch dimension."""

from __future__ import annotations

import torch


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, (B, ...) x (B, ...) -> (B,), computed in fp32.

    Losses return these unreduced values (EDM2 style) so the loop decides how to weight and reduce them;
    fp32 keeps the mean exact when the UNet runs in bf16/fp16.
    """
    diff = pred.float() - target.float()
    return diff.square().flatten(1).mean(dim=1)
