"""`PrunedUNet2DConditionModel` and its transformer siblings: a channel-pruned denoiser as a real diffusers class.

A `channels` student (safeprune.pruning.channels: narrower ResNet inner widths, fewer attention heads, fewer
feed-forward units, residual streams untouched) is a UNet2DConditionModel whose per-layer widths a stock
diffusers config cannot express. This subclass adds ONE config field, `pruned_widths`,
{kind: {block name: size}} with kind `resnet` (inner channels), `heads` (attention heads) or `ffn` (hidden
units), and builds the architecture directly from it: the base UNet from the rest of the config, then each
named site gets fresh layers of the recorded size. No torch-pruning replay and no weights are needed to
build it, so `from_pretrained` works as for any diffusers model (meta-device init, safetensors, strict
shapes) and `save_pretrained` writes a folder that loads again.

The diffusion transformers get the same subclass (`PRUNED`: PixArt's heads and feed-forward units, SD3's and
Flux's feed-forward units). A stock transformer config cannot hold their widths even when every block is cut
alike: PixArt's attention width IS its residual width (num_attention_heads x attention_head_dim), and every
family builds its feed-forward layers at 4 x the residual width with no config field to change it
(diffusers' BasicTransformerBlock has `ff_inner_dim`, which PixArtTransformer2DModel does not pass on).

A pipeline folder names it in model_index.json as ["safeprune", "PrunedUNet2DConditionModel"]; diffusers
imports the library `safeprune` and takes the class from it, so `DiffusionPipeline.from_pretrained(folder)`
works wherever safeprune is installed: no remote code, no pickles.
"""

from __future__ import annotations

import inspect

from diffusers import (
    FluxTransformer2DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from safeprune.pruning.channels import rebuild_sites


def _pruned(base: type) -> type:
    """`base` with the inner widths of `pruned_widths` ({kind: {block: size}}; {} = the base)."""

    def __init__(self, *args, pruned_widths: dict | None = None, **kwargs):
        base.__init__(self, *args, **kwargs)  # the base architecture; registers the base config fields
        widths = {kind: dict(sites) for kind, sites in (pruned_widths or {}).items()}
        self.register_to_config(pruned_widths=widths)
        rebuild_sites(self, widths)

    # ConfigMixin reads a model's config keys from its __init__ signature (from_config passes only those): the
    # base class's parameters plus `pruned_widths`, so every base field stays a config field.
    signature = inspect.signature(base.__init__)
    __init__.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(),
        inspect.Parameter("pruned_widths", inspect.Parameter.KEYWORD_ONLY, default=None)])
    name = f"Pruned{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} with the inner widths of `pruned_widths`."})


PrunedUNet2DConditionModel = _pruned(UNet2DConditionModel)
PrunedSD3Transformer2DModel = _pruned(SD3Transformer2DModel)
PrunedFluxTransformer2DModel = _pruned(FluxTransformer2DModel)
PrunedPixArtTransformer2DModel = _pruned(PixArtTransformer2DModel)
PRUNED = {c.__mro__[1].__name__: c for c in (PrunedUNet2DConditionModel, PrunedSD3Transformer2DModel,
                                             PrunedFluxTransformer2DModel, PrunedPixArtTransformer2DModel)}

# diffusers' save_pretrained names a class outside its own libraries by its module path
# (["safeprune.models.pruned_unet", ...]) and, loading it, looks for the loadable base classes BY NAME in that
# module: ModelMixin must be importable from here, as from `safeprune` itself.
__all__ = ["PRUNED", "ModelMixin", *(c.__name__ for c in PRUNED.values())]
