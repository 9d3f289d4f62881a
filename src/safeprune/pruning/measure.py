"""What a pruned UNet or diffusion transformer costs: parameters, MACs of one call, and measured latency.

MACs come from torch's own `FlopCounterMode` (aten-level shape formulas, works on the meta device), so
pruned widths that no config describes are counted as they run. Attention is forced onto the math SDPA
kernel while counting: the fused CPU kernel has no FLOP formula and would count as zero. We report MACs
with and without the attention-score matmuls (QK^T, AV): the latter is the convention of BK-SDM's
published figures (SD 1.4 UNet: 339 G at 512 px), the former is the real compute.

The same counter measures the diffusion transformers (SD3 / Flux / PixArt): `model_inputs` builds each
family's call (Flux's packed 2x2 latent tokens with their position ids, SD3's pooled projection, SDXL's added
time ids), so one forward pass on meta tensors counts every linear layer and attention product as it runs
(no analytic per-family formula to keep in step with diffusers).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# aten ops of the attention-score matmuls on the math SDPA path (everything else is a layer: conv / linear).
_ATTENTION_OPS = ("bmm", "baddbmm")

DEFAULT_RESOLUTION = 1024  # px, for transformer configs that carry no sample size (Flux): the model's native size


def denoiser_class(name: str):
    """The diffusers class of a supported denoiser (a one-line error naming the supported ones otherwise)."""
    from safeprune.backbones import known_denoisers
    from safeprune.errors import check

    check(name in known_denoisers(), f"{name!r} is not a supported denoiser; safeprune builds: "
                                     f"{', '.join(known_denoisers())}")
    import diffusers

    return getattr(diffusers, name)


def family_of(model) -> str:
    """The supported diffusers class a model is (a safeprune subclass such as PrunedUNet2DConditionModel counts
    as its diffusers base): safeprune.backbones.denoiser_class_of."""
    from safeprune.backbones import denoiser_class_of

    return denoiser_class_of(model)


def meta_model(config: dict, class_name: str | None = None):
    """A denoiser built from its config on the meta device (no weights: seconds at 12 B parameters).
    The class is `class_name`, else the config's `_class_name`, else UNet2DConditionModel."""
    from accelerate import init_empty_weights

    cls = denoiser_class(class_name or config.get("_class_name", "UNet2DConditionModel"))
    with init_empty_weights(include_buffers=True):  # buffers too: SD3's position table would stay on the CPU
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def default_text_tokens(model) -> int:
    """The text length the model's family encodes by default (its backbone's `text_tokens`; CLIP's 77 for a
    UNet of no family)."""
    from safeprune.backbones import BACKBONES, family_key

    return BACKBONES[family_key(model) or "sd"].text_tokens


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


def example_inputs(unet, batch: int = 1, text_tokens: int = 77, sample_size: int | None = None,
                   generator: torch.Generator | None = None) -> dict:
    """Random inputs of the right shapes on the model's device: latents, timesteps, text embeddings, and what
    the family adds (see `model_inputs`). `sample_size` is the latent side; default: the config's."""
    return model_inputs(unet, batch, text_tokens, sample_size, generator)


def model_inputs(model, batch: int = 1, text_tokens: int | None = None, sample_size: int | None = None,
                 generator: torch.Generator | None = None) -> dict:
    """Keyword inputs of one call of any supported denoiser (safeprune.backbones.known_denoisers), random where
    a pipeline would pass data, on the model's device and dtype. `sample_size` = latent side (default: the
    config's, else DEFAULT_RESOLUTION / 8); `text_tokens` default: the family's (`default_text_tokens`)."""
    cfg, family = model.config, family_of(model)
    param = next(model.parameters())
    tokens = text_tokens or default_text_tokens(model)
    size = sample_size or getattr(cfg, "sample_size", None) or DEFAULT_RESOLUTION // 8
    size = size[0] if isinstance(size, (list, tuple)) else size
    gen = generator or torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

    if family == "FluxTransformer2DModel":
        # FluxPipeline packs 2x2 latent patches into tokens: in_channels = 4 x latent channels
        side = size // 2
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        inputs = {"hidden_states": rand(batch, side * side, cfg.in_channels),
                  "encoder_hidden_states": rand(batch, tokens, cfg.joint_attention_dim),
                  "pooled_projections": rand(batch, cfg.pooled_projection_dim),
                  "timestep": torch.full((batch,), 0.5).to(param.device, param.dtype),  # Flux takes t in [0, 1]
                  "img_ids": img_ids.to(param.device, param.dtype),
                  "txt_ids": torch.zeros(tokens, 3).to(param.device, param.dtype)}
        if cfg.guidance_embeds:  # Flux.1-dev is guidance-distilled: the guidance scale is an input
            inputs["guidance"] = torch.full((batch,), 3.5).to(param.device, param.dtype)
        return inputs
    latents = rand(batch, cfg.in_channels, size, size)
    timestep = torch.full((batch,), 500, dtype=torch.long).to(param.device)
    if family == "SD3Transformer2DModel":  # flow-matching timesteps are floats (1000 sigma)
        return {"hidden_states": latents, "encoder_hidden_states": rand(batch, tokens, cfg.joint_attention_dim),
                "pooled_projections": rand(batch, cfg.pooled_projection_dim), "timestep": timestep.float()}
    if family == "PixArtTransformer2DModel":
        extra = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):  # PixArt-alpha 1024 px conditions on the image size
            extra = {"resolution": torch.full((batch, 2), float(size * 8)).to(param.device, param.dtype),
                     "aspect_ratio": torch.ones(batch, 1).to(param.device, param.dtype)}
        # T5's mask as the pipeline pads it: the prompt's tokens (here the first half), then padding
        mask = (torch.arange(tokens) < max(1, tokens // 2)).long().expand(batch, -1).to(param.device)
        return {"hidden_states": latents, "encoder_hidden_states": rand(batch, tokens, cfg.caption_channels),
                "encoder_attention_mask": mask, "timestep": timestep, "added_cond_kwargs": extra}
    cross = cfg.encoder_hid_dim or cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs = {"sample": latents, "timestep": timestep, "encoder_hidden_states": rand(batch, tokens, cross)}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled),
                                       "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch,
                                                                dtype=param.dtype).to(param.device)}
    return inputs


def run_model(model, inputs: dict) -> torch.Tensor:
    """The prediction of one denoiser call (every supported family returns it as `.sample`)."""
    return model(**inputs).sample


@torch.no_grad()
def count_macs(unet, text_tokens: int | None = None, sample_size: int | None = None) -> dict[str, int]:
    """Multiply-accumulates of one denoiser call on one latent at the config's sample size (transformers
    without one: DEFAULT_RESOLUTION), with `text_tokens` of text (default: the family's)."""
    inputs = model_inputs(unet, 1, text_tokens, sample_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run_model(unet, inputs)
    per_op = {str(op).split(".")[-1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}
    total = sum(per_op.values()) // 2  # FlopCounterMode counts 2 FLOPs per multiply-accumulate
    attention = sum(per_op.get(op, 0) for op in _ATTENTION_OPS) // 2
    return {"macs": total, "macs_excl_attention": total - attention}


@torch.no_grad()
def latency_ms(unet, batch: int, runs: int, text_tokens: int | None = None, warmup: int = 2) -> float:
    """Median wall time (ms) of one denoiser call at `batch` latents on the model's device, after warm-up."""
    inputs = model_inputs(unet, batch, text_tokens)
    sync = torch.cuda.synchronize if next(unet.parameters()).is_cuda else (lambda: None)
    times = []
    for i in range(warmup + runs):
        sync()
        start = time.perf_counter()
        run_model(unet, inputs)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
