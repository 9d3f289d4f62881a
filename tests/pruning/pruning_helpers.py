"""Helpers shared by the pruning tests (imported by name; fixtures live in conftest.py)."""

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# SD 1.x's layout (4 stages, attention in the outer three, DownBlock2D innermost, 2 layers per block) at
# toy widths; norm groups small enough that every width stays prunable.
TINY_SD = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32, 32, 32), "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 4,
}


def sd_config(name: str) -> dict:
    return json.loads((ASSETS / f"{name}_unet_config.json").read_text())


def meta_unet(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def unet_inputs(unet, batch: int = 2, tokens: int = 5, seed: int = 0) -> dict:
    """Fixed random UNet inputs (two timesteps far apart) matching `unet`'s config."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return {"sample": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
            "timestep": torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),
            "encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=gen)}


@torch.no_grad()
def run_unet(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample
