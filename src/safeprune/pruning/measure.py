"""What a pruned UNet costs: parameters, MACs of one call, and measured latency of one call.

MACs come from torch's own `FlopCounterMode` (aten-level shape formulas, works on the meta device), so
pruned widths that no config describes are counted as they run. Attention is forced onto the math SDPA
kernel while counting: the fused CPU kernel has no FLOP formula and would count as zero. We report MACs
with and without the attention-score matmuls (QK^T, AV): the latter is the convention of BK-SDM's
published figures (SD 1.4 UNet: 339 G at 512 px), the former is the real compute.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# aten ops of the attention-score matmuls on the math SDPA path (everything else is a layer: conv / linear).
_ATTENTION_OPS = ("bmm", "baddbmm")


def unet_config(unet) -> dict:
    """The UNet's diffusers config as a plain dict, without private `_` keys.

    `_use_default_values` in particular must go: `from_config` would silently restore the defaults it
    lists (e.g. bring back a removed mid block).
    """
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if not k.startswith("_")}


def count_parameters(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def count_nonzero(unet) -> int:
    """L0 norm of all parameters (seed eq. 2); equals count_parameters unless weights are masked."""
    return sum(int(torch.count_nonzero(p)) for p in unet.parameters())


def example_inputs(unet, batch: int = 1, text_tokens: int = 77, sample_size: int | None = None) -> dict:
    """Zero-cost-to-build UNet inputs on the UNet's device: latents, timesteps, text embeddings."""
    cfg = unet.config
    param = next(unet.parameters())
    size = sample_size or cfg.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    cross = cfg.encoder_hid_dim or cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    gen = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(param.device, param.dtype),
        "timestep": torch.full((batch,), 500, dtype=torch.long).to(param.device),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cross, generator=gen).to(param.device, param.dtype),
    }


@torch.no_grad()
def count_macs(unet, text_tokens: int = 77) -> dict[str, int]:
    """Multiply-accumulates of one UNet call on one latent at the config's sample size."""
    inputs = example_inputs(unet, 1, text_tokens)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(**inputs)
    per_op = {str(op).split(".")[-1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}
    total = sum(per_op.values()) // 2  # FlopCounterMode counts 2 FLOPs per multiply-accumulate
    attention = sum(per_op.get(op, 0) for op in _ATTENTION_OPS) // 2
    return {"macs": total, "macs_excl_attention": total - attention}


@torch.no_grad()
def latency_ms(unet, batch: int, runs: int, text_tokens: int = 77, warmup: int = 2) -> float:
    """Median wall time (ms) of one UNet call at `batch` latents on the UNet's device, after warm-up."""
    inputs = example_inputs(unet, batch, text_tokens)
    sync = torch.cuda.synchronize if inputs["sample"].is_cuda else (lambda: None)
    times = []
    for i in range(warmup + runs):
        sync()
        start = time.perf_counter()
        unet(**inputs)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
