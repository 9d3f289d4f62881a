"""`safeprune unlearn --model M --method NAME [--forget "TARGET[=>ANCHOR]" ...] --out DIR`: erase concepts from a
model folder (a diffusers pipeline of any family in safeprune.backbones: SD 1.x/2.x, SDXL, SD3, Flux; or a
pruned / fine-tuned denoiser folder from `prune` / `finetune`).

1. load the model as a pipeline (a UNet folder gets the rest from its base model, safeprune.models.io);
2. the concepts: `unlearn.concepts`, else `finetune.concepts` (which `--forget` fills), else derived from the
   toy world's concept captions (safeprune.unlearning.concepts: every phrasing, anchored on the same scene);
3. run the registered method (safeprune.erasure) on the denoiser (UNet / transformer) in place; pruning masks are re-applied;
4. write DIR atomically as a complete diffusers pipeline folder (the erased UNet with its plan, and the model's
   other components) that `safeprune evaluate/generate --model DIR` and `finetune --student DIR` read, plus
   config.yaml, concepts.json and summary.json ({method, settings, report, seconds}). plan.json gains `masked_layers` (ConceptPrune's
   zeros, kept as masks through loading and fine-tuning) and an `erasure` history entry.
`finetune --method two_stage --unlearn uce|conceptprune|esd_paper` calls `erase_run_folder` after distilling.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from safeprune.config import Config, save_config
from safeprune.errors import check


def run(cfg: Config, args) -> int:
    """CLI target of `safeprune unlearn`: its flags fill cfg.paths (model, out, concept_data) and finetune.concepts."""
    print(unlearn(cfg))
    return 0


def resolve_concepts(cfg: Config, world, n_captions: int = 256):
    """(concepts, derived): unlearn.concepts, else finetune.concepts (--forget), else from the toy captions."""
    from safeprune.unlearning.concepts import derive_concepts

    if cfg.unlearn.concepts or cfg.finetune.concepts:
        return list(cfg.unlearn.concepts or cfg.finetune.concepts), False
    check(bool(world.forbidden_concepts), "no concepts to erase: pass --forget PROMPT, set unlearn.concepts, or "
                                          "forbid a toy concept (toyworld.forbidden_styles)")
    items = [world.sample("concept", i) for i in range(n_captions)]
    concepts, _ = derive_concepts([c for _, c, _ in items], [lab.as_dict() for _, _, lab in items], world.forbidden)
    return concepts, True


def matched_budget(cfg: Config) -> Config:
    """`unlearn.budget: matched` inside two_stage: esd_paper takes bilevel's upper-level budget (as many steps as
    bilevel makes upper steps, finetune.upper.batch_size images each), so the student trains on as many images."""
    ft, un = cfg.finetune, cfg.unlearn
    if un.budget != "matched":
        return cfg
    given = ft.two_stage.unlearn_steps
    steps = given if given >= 0 else ft.max_steps // ft.upper.every
    check(steps > 0, f"two_stage has no unlearning steps (finetune.max_steps={ft.max_steps} < finetune.upper.every="
                     f"{ft.upper.every}); raise max_steps, set finetune.two_stage.unlearn_steps or unlearn.budget=own")
    esd = dataclasses.replace(un.esd_paper, steps=steps, batch_size=ft.upper.batch_size)
    loss = dataclasses.replace(un.loss, steps=steps, batch_size=ft.upper.batch_size)
    return dataclasses.replace(cfg, unlearn=dataclasses.replace(un, esd_paper=esd, loss=loss))


def erase(cfg: Config, pipe, concepts, derived: bool, world, *, method: str | None = None, concept_data=None,
          progress: bool = True) -> dict:
    """Run the erasure method on the pipeline's denoiser (UNet / transformer) in place; returns its report (+
    "method", "seconds")."""
    from safeprune.erasure import ErasureContext, build_erasure, check_concepts
    from safeprune.pruning import reapply_masks
    from safeprune.sampling import backbone_of_pipe

    name = method or cfg.unlearn.method
    eraser = build_erasure(cfg, name)  # an unknown name fails before anything heavy
    denoiser = backbone_of_pipe(pipe).denoiser_of(pipe)  # every family's (safeprune.backbones)
    check_concepts(concepts)
    ctx = ErasureContext(pipe=pipe, concepts=concepts, world=world, cfg=cfg, device=denoiser.device,
                         concept_data=concept_data, derived=derived, progress=progress)
    start = time.perf_counter()
    report = eraser(denoiser, ctx)
    reapply_masks(denoiser)  # a magnitude-pruned student keeps its zeros whatever the method did
    return {"method": name, "settings": dataclasses.asdict(eraser), **report,
            "seconds": round(time.perf_counter() - start, 2)}


def erased_plan(plan: dict, report: dict) -> dict:
    """The model's plan with the erasure recorded: masked layers united, one `erasure` history entry appended."""
    plan = dict(plan)
    masked = report.get("masked_layers", [])
    if masked:
        plan["masked_layers"] = sorted(set(plan.get("masked_layers", [])) | set(masked))
    entry = {"method": report["method"], "settings": report["settings"]}
    plan["erasure"] = [*plan.get("erasure", []), entry]
    return plan


def _load(model: str | Path | None, device):
    """(pipeline, plan, components folder, hub id) of a pipeline, run or saved-UNet folder (None = the toy teacher).

    The components folder holds the VAE / text encoder / tokenizer / scheduler the erased model is saved with:
    the pipeline itself, else the UNet's base model (a hub id's cache snapshot, a local path, or the toy teacher)."""
    from safeprune.models.io import base_model_of, is_hub_id, load_pipeline, load_plan, model_folder, pretrained_folder
    from safeprune.models.shipped import teacher_path

    folder = model_folder(model) if model is not None else teacher_path()
    check(folder.is_dir(), f"model folder {str(folder)!r} not found; pass a diffusers pipeline folder or a folder "
                           "written by `safeprune prune` / `finetune` / `unlearn`")
    pipe = load_pipeline(folder, device=device)
    base = base_model_of(folder)
    hub = str(base) if base and is_hub_id(base) else None
    if (folder / "model_index.json").is_file():
        components = folder
    else:
        components = pretrained_folder(base) if base else teacher_path()
    plan = load_plan(folder)
    restore_masks(pipe, plan)
    return pipe, plan, components, hub


def restore_masks(pipe, plan: dict) -> None:
    """Give the pipeline's denoiser its plan's masks (magnitude zeros, earlier ConceptPrune zeros): a pipeline
    folder loads through stock diffusers, which knows no masks, and the method must not fill those zeros in."""
    from safeprune.pruning import after_load
    from safeprune.sampling import backbone_of_pipe

    after_load(backbone_of_pipe(pipe).denoiser_of(pipe), plan)


def unlearn(cfg: Config) -> Path:
    """Erase concepts from cfg.paths.model ("" = the toy teacher) into cfg.paths.out; returns the folder."""
    from safeprune.data.toyworld import ToyWorld
    from safeprune.erasure import build_erasure
    from safeprune.models.io import write_model
    from safeprune.sampling import backbone_of_pipe
    from safeprune.utils import atomic_folder, resolve_device, seed_everything

    check(bool(cfg.paths.out), "safeprune unlearn needs --out DIR (the erased model's folder)")
    build_erasure(cfg)  # an unknown --method fails before the model loads
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    concepts, derived = resolve_concepts(cfg, world)
    model, concept_data = cfg.paths.model or None, cfg.paths.concept_data or None
    out = Path(cfg.paths.out)
    with atomic_folder(out) as tmp:
        seed_everything(cfg.seed)
        pipe, plan, components, hub = _load(model, resolve_device(cfg.device))
        report = erase(cfg, pipe, concepts, derived, world, concept_data=concept_data)
        denoiser = backbone_of_pipe(pipe).denoiser_of(pipe)
        write_model(denoiser, tmp, erased_plan(plan, report), components, hub)  # a complete pipeline folder
        save_config(cfg, tmp)
        (tmp / "concepts.json").write_text(json.dumps([dataclasses.asdict(c) for c in concepts], indent=1))
        (tmp / "summary.json").write_text(json.dumps({"model": str(model) if model else "toy-teacher",
                                                      "concepts": len(concepts), **report}, indent=1))
    print(f"unlearn {report['method']}: {len(concepts)} concepts in {report['seconds']:.1f} s")
    return out


def erase_run_folder(cfg: Config, run_dir: Path) -> dict:
    """two_stage's second stage for a whole-model method: erase the distilled student saved in `run_dir` and
    write it back in place (weights and plan into a temporary folder first, config.json last, as the run's
    own save). Returns the report; the caller records it in summary.json."""
    import os
    import shutil
    import tempfile

    from safeprune.data.toyworld import ToyWorld
    from safeprune.models.io import base_model_of, is_hub_id, load_pipeline, load_plan, model_folder, write_unet
    from safeprune.sampling import backbone_of_pipe
    from safeprune.utils import resolve_device

    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    concepts, derived = resolve_concepts(cfg, world)
    pipe = load_pipeline(run_dir, device=resolve_device(cfg.device))
    restore_masks(pipe, load_plan(run_dir))
    report = erase(matched_budget(cfg), pipe, concepts, derived, world, method=cfg.finetune.unlearn.name,
                   concept_data=cfg.paths.concept_data or None)
    plan = erased_plan(load_plan(run_dir), report)
    backbone = backbone_of_pipe(pipe)
    unet_dir = model_folder(run_dir) / backbone.denoiser  # the run's saved pipeline: only its denoiser changes
    base = base_model_of(unet_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".erased.", dir=unet_dir))
    try:
        write_unet(backbone.denoiser_of(pipe), tmp, plan, None, base if base and is_hub_id(base) else None)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            path.chmod(0o644)
            os.replace(path, unet_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (run_dir / "concepts.json").write_text(json.dumps([dataclasses.asdict(c) for c in concepts], indent=1))
    return {**report, "concepts": len(concepts)}
