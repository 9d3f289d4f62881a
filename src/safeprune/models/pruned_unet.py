"""`PrunedUNet2DConditionModel`: a channel-pruned UNet as a real diffusers model class.

A `channels` student (safeprune.pruning.channels: narrower ResNet inner widths, fewer attention heads, fewer
feed-forward units, residual streams untouched) is a UNet2DConditionModel whose per-layer widths a stock
diffusers config cannot express. This subclass adds ONE config field, `pruned_widths`,
{kind: {block name: size}} with kind `resnet` (inner channels), `heads` (attention heads) or `ffn` (hidden
units), and builds the architecture directly from it: the base UNet from the rest of the config, then each
named site gets fresh layers of the recorded size. No torch-pruning replay and no weights are needed to
build it, so `from_pretrained` works as for any diffusers model (meta-device init, safetensors, strict
shapes) and `save_pretrained` writes a folder that loads again.

A pipeline folder names it in model_index.json as ["safeprune", "PrunedUNet2DConditionModel"]; diffusers
imports the library `safeprune` and takes the class from it, so `DiffusionPipeline.from_pretrained(folder)`
works wherever safeprune is installed: no remote code, no pickles.
"""

from __future__ import annotations

import inspect

from diffusers import ModelMixin, UNet2DConditionModel

from safeprune.pruning.channels import rebuild_sites


class PrunedUNet2DConditionModel(UNet2DConditionModel):
    """UNet2DConditionModel with the inner widths of `pruned_widths` ({kind: {block: size}}; {} = the base)."""

    def __init__(self, *args, pruned_widths: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)  # the base architecture; registers the base config fields
        widths = {kind: dict(sites) for kind, sites in (pruned_widths or {}).items()}
        self.register_to_config(pruned_widths=widths)
        rebuild_sites(self, widths)


# diffusers' save_pretrained names a class outside its own libraries by its module path
# (["safeprune.models.pruned_unet", ...]) and, loading it, looks for the loadable base classes BY NAME in that
# module: ModelMixin must be importable from here, as from `safeprune` itself.
__all__ = ["ModelMixin", "PrunedUNet2DConditionModel"]

# ConfigMixin reads a model's config keys from its __init__ signature (from_config passes only those): the
# base class's parameters plus `pruned_widths`, so every UNet2DConditionModel field stays a config field.
_base = inspect.signature(UNet2DConditionModel.__init__)
PrunedUNet2DConditionModel.__init__.__signature__ = _base.replace(parameters=[
    *_base.parameters.values(),
    inspect.Parameter("pruned_widths", inspect.Parameter.KEYWORD_ONLY, default=None)])
