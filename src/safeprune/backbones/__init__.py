"""Backbone families: what the fine-tuning loop, the samplers and the model folders need to know about a
diffusers pipeline besides its weights (seed paper Sec. 3 on any text-to-image backbone).

A `Backbone` (the members of `safeprune.backbones.sd.SD`, the base class) says how to load and assemble the
pipeline, how to encode prompts, how to call the denoiser, the training target and its noise schedule
(safeprune.backbones.base), which block outputs feature KD matches, which parameters are the attention that
reads the text (ESD-x, UCE) and how to sample. The family of a model is read from its folder
(`backbone_of`): model_index.json's pipeline class, or a bare denoiser's config.json. Adding a family is one
file here and one line in BACKBONES; its key is the name errors and summaries use.

  sd     Stable Diffusion 1.x / 2.x: one CLIP, UNet, eps or v on the DDPM schedule
  sdxl   SDXL: two CLIPs, pooled text + time ids as added conditioning, UNet, eps or v
  sd3    SD3-class MMDiT: CLIP-L/G (+ optional T5), SD3Transformer2DModel, rectified-flow velocity
  flux   FLUX.1: CLIP pooled + T5, FluxTransformer2DModel on packed latents, rectified-flow velocity
  pixart PixArt-alpha / -sigma: T5 with its attention mask, PixArtTransformer2DModel, eps (learned sigma dropped)
"""

from __future__ import annotations

import json
from pathlib import Path

from safeprune.backbones.base import PromptEmbeddings
from safeprune.backbones.flux import Flux
from safeprune.backbones.pixart import PixArt
from safeprune.backbones.sd import SD
from safeprune.backbones.sd3 import SD3
from safeprune.backbones.sdxl import SDXL
from safeprune.errors import UserError, check, choose

BACKBONES: dict[str, SD] = {
    "sd": SD(),
    "sdxl": SDXL(),
    "sd3": SD3(),
    "flux": Flux(),
    "pixart": PixArt(),
}


def get_backbone(name: str) -> SD:
    return choose("backbone family", name, BACKBONES)


def _supported() -> str:
    return ", ".join(f"{b.pipelines[0]} ({k})" for k, b in BACKBONES.items())


def backbone_for_pipeline(class_name: str, where: str = "the model") -> SD:
    """The family whose pipeline class is `class_name` (model_index.json's _class_name)."""
    for backbone in BACKBONES.values():
        if class_name in backbone.pipelines:
            return backbone
    raise UserError(f"{where} is a {class_name}, which safeprune does not support; supported: {_supported()}")


def backbone_for_config(config: dict, where: str = "the model") -> SD:
    """The family of a denoiser config.json (a bare UNet / transformer folder)."""
    for backbone in BACKBONES.values():
        if backbone.owns_config(config):
            return backbone
    name = config.get("_class_name", "UNet2DConditionModel")
    extra = f" with addition_embed_type={config.get('addition_embed_type')!r}" if config.get("addition_embed_type") else ""
    raise UserError(f"{where} holds a {name}{extra}, which safeprune does not support; supported: {_supported()}")


def backbone_of(folder: str | Path, where: str | None = None) -> SD:
    """The family of a model folder: a pipeline folder by its model_index.json, a denoiser folder by its
    config.json; anything else is the SD family (the toy teacher's layout)."""
    folder = Path(folder)
    where = where or repr(str(folder))
    for name in ("model_index.json", "config.json"):
        if (folder / name).is_file():
            try:
                data = json.loads((folder / name).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{str(folder / name)!r} is not valid JSON ({err}); re-create the folder") from err
            check(isinstance(data, dict), f"{str(folder / name)!r} must hold a JSON object")
            if name == "model_index.json":
                return backbone_for_pipeline(data.get("_class_name", "StableDiffusionPipeline"), where)
            return backbone_for_config(data, where)
    return BACKBONES["sd"]


def denoiser_classes() -> tuple[str, ...]:
    """Every diffusers model class a saved student may be (config.json's _class_name)."""
    return tuple(dict.fromkeys(c for b in BACKBONES.values() for c in b.denoiser_classes))


def known_denoisers() -> tuple[str, ...]:
    """Every diffusers denoiser class safeprune builds from a config (config.json's _class_name), without
    safeprune's own subclasses."""
    return tuple(c for c in denoiser_classes() if not c.startswith("Pruned"))


def denoiser_class_of(model) -> str:
    """The diffusers denoiser class `model` is (a safeprune subclass such as PrunedUNet2DConditionModel counts as
    its diffusers base), else its own class name."""
    known = known_denoisers()
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in known), type(model).__name__)


def family_key(model) -> str | None:
    """The family of a denoiser model: a BACKBONES key, or None when it is none of them (e.g. a UNet with
    another added embedding)."""
    name = denoiser_class_of(model)
    config = {**dict(getattr(model, "config", {})), "_class_name": name}
    return next((key for key, b in BACKBONES.items() if b.owns_config(config)), None)


def denoiser_component(folder: Path) -> str | None:
    """The denoiser's subfolder name in a pipeline folder (unet / transformer), None when there is none."""
    return next((b.denoiser for b in BACKBONES.values() if (folder / b.denoiser / "config.json").is_file()), None)


def is_cross_attention(name: str) -> bool:
    """Whether parameter `name` belongs to attention that reads the text, in any family (the fragments of
    different families never occur in another's models: attn2 is the UNet/PixArt cross-attention, add_k/v_proj
    MMDiT's text keys/values)."""
    name = f".{name}"
    return any(fragment in name for b in BACKBONES.values() for fragment in b.cross_attention)


__all__ = ["BACKBONES", "PromptEmbeddings", "backbone_for_config", "backbone_for_pipeline",
           "backbone_of", "denoiser_class_of", "denoiser_classes", "denoiser_component", "family_key", "get_backbone",
           "is_cross_attention", "known_denoisers"]
