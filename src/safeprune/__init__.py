"""safeprune: prune diffusion UNets, distill them from the teacher, and suppress concepts in one bilevel run.

The top-level names are imported lazily so `import safeprune` (and `safeprune --help`) stays fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "teacher_path": "safeprune.models.shipped",
    "judge_path": "safeprune.models.shipped",
    "load_teacher": "safeprune.models.shipped",
    "load_judge": "safeprune.eval.judge",
    "load_unet": "safeprune.models.io",
    "load_pipeline": "safeprune.models.io",
    "save_unet": "safeprune.models.io",
    "save_model": "safeprune.models.io",
    # diffusers imports this class by name for model_index.json's ["safeprune", "PrunedUNet2DConditionModel"],
    # and finds how to load it by looking up its base classes' names IN THIS MODULE (getattr(safeprune,
    # "ModelMixin")): diffusers' ModelMixin must be reachable here for DiffusionPipeline.from_pretrained.
    "PrunedUNet2DConditionModel": "safeprune.models.pruned_unet",
    "PrunedSD3Transformer2DModel": "safeprune.models.pruned_unet",
    "PrunedFluxTransformer2DModel": "safeprune.models.pruned_unet",
    "PrunedPixArtTransformer2DModel": "safeprune.models.pruned_unet",
    "ModelMixin": "diffusers",
    "prune": "safeprune.pruning",
    "finetune": "safeprune.recipes.finetune",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safeprune' has no attribute {name!r}")


__all__ = list(_EXPORTS)
