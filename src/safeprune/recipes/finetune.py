"""`safeprune finetune`: distil a pruned student from its teacher and suppress concepts (seed paper Sec. 3).

One loop, top to bottom:
  1. load the frozen teacher pipeline and the pruned student; check they fit (a dry forward pass);
  2. build the fixed pools once: VAE latents of fine-tuning and concept images, text embeddings of every
     caption and concept prompt (`safeprune.bilevel.pools`);
  3. run the method's step function (`safeprune.bilevel`: distill | two_stage | bilevel alternating/penalty)
     under Accelerate (device, mixed precision, DDP), with per-step metrics, TensorBoard, a progress bar,
     and atomic checkpoints every `finetune.ckpt_every_steps`;
  4. save the student as RUN/model/, a complete diffusers pipeline folder with a model card
     (`DiffusionPipeline.from_pretrained(RUN/model)`; safeprune.models.io), apart from the training state.

Run folder: model/ (the result: model_index.json, unet/, the teacher's other components, README.md),
config.yaml, concepts.json ([{target, anchor}] suppressed), summary.json (method, steps, upper_steps,
world_size, params_in_sync / optimizer_states_in_sync (bit-identical on every DDP rank; null under FSDP),
pass counts, matched feature blocks, wall time, training images used), checkpoints/step_NNNNNNN/ (each a
--model for `generate` / `evaluate`: state.json records the plan and the teacher), logs/ (the tracker:
finetune.report_to), validation/step_NNNNNNN.png (finetune.validation_every_steps),
and metrics.jsonl, one line per iteration with the keys present that step:
  step; lower/diff, lower/out_kd, lower/feat_kd, lower/ft (batch means of eq. 1, 3, 4, 8); upper/cu (L_CU);
  outer/ft, outer/lambda, outer/gap (penalty outer steps); lr/lower, lr/upper; student_fwd, student_bwd,
  teacher_fwd (cumulative passes of this process, counted in images); time_s (since this process started).
Exact resume: a step's randomness depends only on (seed, rank, step), and checkpoints hold the weights,
both optimisers and the pass counters, so `--resume` continues bit-for-bit on CPU.
Multi-GPU: `accelerate launch` with the shipped accelerate/*.yaml (`safeprune presets`; DDP or FSDP); what sharding changes in the
two-optimiser step (evaluation through the wrapper, clipping, gathered checkpoints) is in safeprune.bilevel.distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

from safeprune.bilevel import build_method, uses_upper
from safeprune.bilevel.pools import build_pools, upper_images
from safeprune.bilevel.training import build_training
from safeprune.config import Config, save_config, to_dict
from safeprune.errors import UserError, check
from safeprune.models.hooks import match_features
from safeprune.optim import optimizer_of
from safeprune.utils import DTYPES, warmup_cosine

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# Config keys that may change when a run is resumed (e.g. a lower lr after a divergence, more steps);
# any other difference would make the resumed run a different run.
RESUMABLE_CHANGES = {f"finetune.{k}" for k in ("max_steps", "ckpt_every_steps", "keep_checkpoints",
                                               "eval_every_steps", "lr", "upper.lr", "report_to",
                                               "validation_every_steps", "validation_prompts",
                                               "validation_seeds")} | {"paths.out"}
VALIDATION = "validation"  # RUN/validation/step_NNNNNNN.png: the validation grids


def run(cfg: Config, args) -> int:
    """CLI target of `safeprune finetune`: its flags fill cfg.paths, cfg.model.teacher and finetune.concepts."""
    out = finetune(cfg, resume=args.resume, overwrite=args.overwrite, allow_other_teacher=args.allow_other_teacher)
    print(out)
    if getattr(args, "push_to_hub", None):
        from safeprune.models.card import push_to_hub
        from safeprune.models.io import MODEL

        print(f"pushed to {push_to_hub(Path(out) / MODEL, args.push_to_hub)}")
    return 0


def resolve_mixed_precision(cfg: Config) -> Config:
    """`cfg` with the mixed precision the run uses, as diffusers' training scripts decide it: `accelerate launch`'s
    (ACCELERATE_MIXED_PRECISION, from its config file or --mixed_precision) unless finetune.mixed_precision
    names one; a named one that disagrees with the launcher's is a one-line error (a silent winner would
    leave config.yaml or the launcher wrong)."""
    import os

    ft = cfg.finetune
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "")
    check(not (ft.mixed_precision and launched and launched != ft.mixed_precision),
          f"finetune.mixed_precision={ft.mixed_precision} but accelerate launch was given mixed_precision={launched} "
          "(its config file or --mixed_precision); make them agree, or set finetune.mixed_precision='' to take "
          "the launcher's")
    chosen = ft.mixed_precision or launched or "no"
    return dataclasses.replace(cfg, finetune=dataclasses.replace(ft, mixed_precision=chosen))


# ----------------------------------------------------------------------------- schedules (pure in step)


def _due(step: int, every: int, total: int) -> bool:
    """Whether iteration `step` (0-based) ends a period of `every` iterations, or ends the run: checkpoints and
    evaluations also happen at the last step (two_stage's unlearning may end between two periods)."""
    return (step + 1) % every == 0 or step + 1 == total


# ----------------------------------------------------------------------------- run folder


def _checkpoints(out: Path) -> list[Path]:
    from safeprune.checkpoint import step_folders

    return step_folders(out / CHECKPOINTS)


# what a run writes at its top level besides the result (claimed in the run marker before it is written)
RUN_FILES = ("config.yaml", "concepts.json", METRICS, "logs", CHECKPOINTS, "summary.json", VALIDATION)
LINEAGE = "lineage.json"  # written by `safeprune prune`: the fingerprint of the teacher the student was pruned from


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"finetune": {"lr": 1}} -> {"finetune.lr": 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= _flat(value, name + ".") if isinstance(value, dict) else {name: value}
    return out


def _prepare_run_dir(out: Path, resume: bool, cfg: Config, total_steps: int, overwrite: bool = False,
                     inputs: dict | None = None, schedule: dict | None = None):
    """Validate `out` for a fresh run, an `--overwrite` or a resume (safeprune.runs); returns the RunFolder
    and the checkpoint to resume from (None: from step 0, e.g. a run killed before its first checkpoint).

    `schedule` is the method's (safeprune.bilevel.solvers): a resume may add steps, never move a stage boundary
    or a lambda schedule that the checkpointed steps already followed."""
    from safeprune.checkpoint import latest
    from safeprune.runs import open_run

    run = open_run(out, "finetune", resume=resume, overwrite=overwrite, clean=_is_main_rank(),
                   legacy=lambda folder: bool(_checkpoints(folder)) and (folder / "config.yaml").is_file())
    if not resume:
        return run, None
    found = latest(out / CHECKPOINTS, set_aside=_is_main_rank())
    old_cfg = found[1].get("config") if found else run.marker.get("config")
    old, new = _flat(old_cfg or {}), _flat(to_dict(cfg))
    for key in sorted(set(old) | set(new)) if old_cfg else []:
        if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES:
            raise UserError(f"--resume: {key} was {old.get(key)!r} when the run started but is {new.get(key)!r} now; "
                            "resume with the same configuration (and the same --forget flags)")
    _check_inputs(run.marker.get("inputs") or {}, inputs or {})
    was = found[1].get("schedule") if found else None
    check(schedule is None or was is None or was == schedule,
          f"--resume: finetune.max_steps={cfg.finetune.max_steps} changes the {cfg.finetune.method} schedule of the "
          f"checkpoint ({was} -> {schedule}); resume with --max-steps {old.get('finetune.max_steps')}, or start a new run")
    step = found[1]["step"] if found else 0
    check(not (run.state == "finished" and step >= total_steps),
          f"the run in {str(out)!r} is already complete ({step} steps); raise --max-steps to continue it")
    check(step <= total_steps, f"the last checkpoint in {str(out)!r} is at step {step}, past the {total_steps} "
                               "steps asked for; raise --max-steps")
    return run, found[0] if found else None


# what a run read beyond the paths config.yaml names (the resume check compares those as config keys)
INPUT_FLAGS = {"student_digest": "the --student folder's contents", "data_digest": "the --data contents",
               "concept_data_digest": "the --concept-data contents", "teacher_fingerprint": "the teacher's weights"}


def _check_inputs(old: dict, new: dict) -> None:
    """--resume reads what the run started with: a changed input is a one-line error naming it."""
    for key, flag in INPUT_FLAGS.items():
        if key in old and key in new and old[key] != new[key]:
            raise UserError(f"--resume: {flag} was {old[key]!r} when the run started but is {new[key]!r} now; "
                            "resume with the inputs the run started with (or start again with --overwrite)")


def _source(spec) -> tuple[str | None, str | None]:
    """(how a --data/--concept-data/--student source is named, a digest of its index) for the resume check."""
    from safeprune.utils import sha256_file

    if spec is None:
        return None, None
    path = Path(spec)
    if not path.exists():
        return str(spec), None  # shards pattern, hub id, glob
    index = [p for p in (path / "metadata.jsonl", path / "config.json", path / "plan.json") if p.is_file()]
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    digest = "-".join([*(sha256_file(p)[:12] for p in index), *(str(p.stat().st_size) for p in weights)])
    return str(path.resolve()), digest or None


def _is_main_rank() -> bool:
    """Before Accelerate starts: whether this process is rank 0 (`accelerate launch` sets RANK)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _check_lineage(student_dir: Path, teacher_fp: str, allow_other: bool) -> None:
    """The student must come from this teacher (`safeprune prune` records the fingerprint) unless allowed."""
    path = student_dir / LINEAGE
    if not path.is_file():  # pruned before lineage was recorded (or saved through the Python API): unknown
        return
    try:
        recorded = json.loads(path.read_text()).get("teacher_fingerprint")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{str(path)!r} is corrupt ({type(err).__name__}); prune the student again") from err
    check(allow_other or recorded == teacher_fp,
          f"the student in {str(student_dir)!r} was pruned from another teacher (fingerprint {recorded}, this teacher "
          f"{teacher_fp}); pass the --teacher it was pruned from, or --allow-other-teacher to distil it anyway")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the resumed checkpoint (they will be re-run and re-logged); a line torn by a
    kill is dropped too. Rewritten atomically: a kill here never loses the lines kept."""
    from safeprune.utils import atomic_file

    if path.is_file():
        lines = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= last_step:
                    lines.append(line)
        with atomic_file(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))


def _check_memory(cfg: Config, student_dir: Path, pipe, device) -> None:
    """Refuse, before the run folder is made, a run whose estimated peak (safeprune.memory) exceeds the device.
    The estimate runs on meta-device copies built from the configs (no second copy of the weights)."""
    from safeprune.memory import check_fits, estimate_memory, meta_unet
    from safeprune.models.io import build_unet, load_plan

    ft = cfg.finetune
    # the architecture straight from the plan's saved config, as the dry run builds it: no torch-pruning replay
    student = build_unet(load_plan(student_dir), student_dir)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent = ft.resolution // vae_scale if ft.resolution else pipe.unet.config.sample_size
    encoders = sum(p.numel() for m in (pipe.vae, pipe.text_encoder) for p in m.parameters())
    check_fits(estimate_memory(cfg, student, meta_unet(dict(pipe.unet.config)), latent_size=latent,
                               encoder_params=encoders), device)


# ----------------------------------------------------------------------------- the run


def finetune(cfg: Config, *, resume: bool = False, on_eval=None, overwrite: bool = False,
             allow_other_teacher: bool = False) -> Path:
    """Fine-tune the pruned UNet in cfg.paths.student into the run folder cfg.paths.out; returns the run folder.

    Inputs are cfg.model.teacher ("" = the toy teacher), cfg.paths.data and cfg.paths.concept_data ("" = the toy
    splits), so the run's config.yaml names all of them. `on_eval(step, unet) -> dict` (Python API only) is
    called every `finetune.eval_every_steps` steps on the main process; its numbers are logged with the step's.
    `resume` continues the run in cfg.paths.out (from its newest verified checkpoint, or step 0); `overwrite`
    starts again in a folder an earlier run wrote; `allow_other_teacher` distils a student pruned from another.
    """
    from safeprune.bilevel.solvers import Distill
    from safeprune.erasure import WHOLE_MODEL
    from safeprune.models.shipped import teacher_path
    from safeprune.unlearning import build_unlearning

    check(bool(cfg.paths.student) and bool(cfg.paths.out),
          "safeprune finetune needs --student DIR (from `safeprune prune`) and --out DIR (the run folder)")
    cfg = resolve_mixed_precision(cfg)  # config.yaml records the precision the run really used
    ft = cfg.finetune
    out, student = Path(cfg.paths.out), Path(cfg.paths.student)
    data, concept_data = cfg.paths.data or None, cfg.paths.concept_data or None
    method = build_method(ft)  # validates method / solver / budgets before anything heavy happens
    optimizer_of(ft.optimizer)  # and the optimiser's name, before the run folder is made
    # two_stage with a whole-model erasure method (uce, conceptprune, esd_paper): distil, then erase the result
    erasure = ft.unlearn.name if getattr(method, "erases_last", False) and ft.unlearn.name in WHOLE_MODEL else None
    if erasure is not None:
        from safeprune.erasure import build_erasure
        from safeprune.recipes.unlearn import matched_budget

        build_erasure(matched_budget(cfg), erasure)  # its settings and budget are checked now, not after distilling
        method = Distill(ft.max_steps)
    unlearning = build_unlearning(ft.unlearn.name, ft.unlearn) if uses_upper(method) else None
    check(student.is_dir(), f"student folder {str(student)!r} not found; create one with `safeprune prune --out DIR`")
    check(unlearning is None or upper_images(ft, unlearning) != "anchor" or bool(cfg.paths.anchor_data)
          or concept_data is None,
          f"the upper level noises images of the anchor prompts (--unlearn {ft.unlearn.name}, finetune.upper.images="
          f"{ft.upper.images or 'its own'}); with --concept-data pass --anchor-data DIR too, e.g. the teacher's "
          "samples from `safeprune concept-images --prompts ANCHOR`")
    check(ft.eval_every_steps == 0 or on_eval is not None,
          "finetune.eval_every_steps needs an evaluation callback (Python API: finetune(..., on_eval=...)); "
          "set it to 0 and evaluate the run folder with `safeprune evaluate`")
    from safeprune.models.io import pretrained_folder

    teacher = cfg.model.teacher or None
    # A local folder, or a hub id's snapshot in the HF cache (fetched only with model.allow_download).
    teacher_dir = pretrained_folder(teacher, cfg.model.revision, cfg.model.allow_download) if teacher else None
    check(teacher_dir is None or (teacher_dir / "model_index.json").is_file(),
          f"teacher folder {teacher!r} is not a diffusers pipeline (no model_index.json); pass --teacher PATH "
          "to a Stable Diffusion pipeline folder or a hub id")
    # The run folder names its base pipeline for load_pipeline (a hub id stays an id); None = the toy teacher.
    base_model = teacher
    from safeprune.runs import lock

    # what config.yaml cannot show: the contents behind the paths it names (checked again by --resume)
    inputs = {f"{key}_digest": _source(spec)[1] for key, spec in (("student", student), ("data", data),
                                                                     ("concept_data", concept_data))}
    # two_stage's erasure stage runs before the run is marked finished, so a kill during it resumes into it
    finish = (lambda: _second_stage(cfg, out)) if erasure is not None else None
    with lock(out, "finetune") if _is_main_rank() else contextlib.nullcontext():
        run, resume_from = _prepare_run_dir(out, resume, cfg, method.total_steps, overwrite, inputs, method.schedule)
        return _train(cfg, method, unlearning, student, teacher_dir or teacher_path(), base_model, out, data,
                      concept_data, resume_from, on_eval, run=run, inputs=inputs,
                      allow_other_teacher=allow_other_teacher, finish=finish)


def _second_stage(cfg: Config, out: Path) -> None:
    """two_stage's erasure stage on the distilled student in `out`; summary.json records it and its passes."""
    from safeprune.recipes.unlearn import erase_run_folder

    t0 = time.perf_counter()
    report = erase_run_folder(cfg, out)
    summary = json.loads((out / "summary.json").read_text())
    counts = dict(summary["counts"])
    for key, value in report.get("counts", {}).items():  # the erasure's own student passes (esd_paper)
        if key.startswith("student"):
            counts[key] = counts.get(key, 0) + value
    report.pop("masked_layers", None)
    summary |= {"method": "two_stage", "unlearn": cfg.finetune.unlearn.name, "erasure": report, "counts": counts,
                "upper_steps": report.get("steps", 0), "steps": summary["steps"] + report.get("steps", 0),
                "wall_s": round(summary["wall_s"] + time.perf_counter() - t0, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def _train(cfg, method, unlearning, student_dir, teacher_dir, base_model, out, data, concept_data, resume_from,
           on_eval, *, run=None, inputs=None, allow_other_teacher=False, finish=None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from safeprune.backbones import BACKBONES, backbone_for_config, backbone_of
    from safeprune.bilevel.problem import NonFiniteLoss
    from safeprune.checkpoint import WeightsDiverged, check_weights, load_checkpoint, max_abs, save_step
    from safeprune.models.io import (
        MODEL,
        check_supported_unet,
        checkpoint_record,
        load_pipeline,
        load_plan,
        load_unet,
        unet_class,
    )
    from safeprune.pruning.depth import kept_blocks
    from safeprune.utils import fingerprint, resolve_device, seed_everything

    ft = cfg.finetune
    if ft.report_to == "wandb":
        import importlib.util

        check(importlib.util.find_spec("wandb") is not None,
              "finetune.report_to=wandb needs wandb: pip install 'safeprune[wandb]' (or report_to=tensorboard)")
    accelerator = Accelerator(cpu=resolve_device(cfg.device).type == "cpu", mixed_precision=ft.mixed_precision,
                              log_with=None if ft.report_to == "none" else ft.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    device, main = accelerator.device, accelerator.is_main_process
    seed_everything(cfg.seed)

    # 1. models: the frozen teacher (eval, no grad, optionally low precision) and the trainable student.
    pipe = load_pipeline(teacher_dir)
    backbone = backbone_of(teacher_dir)  # the family: text encoders, denoiser call, target (safeprune.backbones)
    backbone.check_prediction_type(pipe.scheduler.config, cfg.model.prediction_type, cfg.model.teacher or teacher_dir)
    teacher_where = f"teacher {str(cfg.model.teacher or teacher_dir)!r}"
    check_supported_unet(backbone.denoiser_of(pipe).config, teacher_where, families=tuple(BACKBONES))
    cls, config = unet_class(load_plan(student_dir))
    student_family = backbone_for_config({"_class_name": cls.__name__, **config}, f"student {str(student_dir)!r}")
    check(student_family.name == backbone.name, f"the student in {str(student_dir)!r} is a {student_family.name} "
                                                f"model but the {teacher_where} is {backbone.name}; prune the student "
                                                "from this teacher")  # before any pass
    inputs = {**(inputs or {}), "teacher_fingerprint": fingerprint(backbone.denoiser_of(pipe))}
    _check_lineage(student_dir, inputs["teacher_fingerprint"], allow_other_teacher)
    if run is not None and run.marker:
        _check_inputs(run.marker.get("inputs") or {}, inputs)
    if backbone.name == "sd":  # the estimate models SD 1.x/2.x UNet calls (safeprune.memory)
        _check_memory(cfg, student_dir, pipe, device)
    student_core = load_unet(student_dir).to(device).train()
    start_max = max_abs({"student": student_core})  # the bound of check_weights (before any resumed weights)
    teacher = backbone.denoiser_of(pipe).to(device).eval().requires_grad_(False)
    if ft.teacher_dtype != "fp32":
        teacher = teacher.to(DTYPES[ft.teacher_dtype])
    scheduler = backbone.training_scheduler(pipe)

    # 2. pools and embeddings, once; the VAE and text encoder are not needed afterwards.
    pools, concepts = build_pools(cfg, pipe, unlearning, data, concept_data, device, backbone)
    # (C, h, w); a stream knows it from the family (Flux's transformer config has no sample size to guess from)
    latent_shape = tuple(pools.lower.mean.shape[1:]) if hasattr(pools.lower, "mean") else pools.lower.latent_shape
    data_info = _data_info(pools, data, cfg)
    if main:
        shown = data_info["training_images"] or "fresh images every step"
        print(f"training images: {shown} (source: {data_info['source_images'] or 'size unknown'}; "
              f"{data_info['data_mode']} mode)", flush=True)
    validate = _validation(cfg, pipe, student_core, concepts, pools, out, backbone) \
        if ft.validation_every_steps and main else None
    del pipe  # the VAE and text encoder live on in `validate` only when validation images are asked for
    # a depth-pruned student's blocks pair with the teacher blocks they were copied from (its plan records them)
    kept = kept_blocks(load_plan(student_dir), student_core)
    pairs = match_features(teacher, student_core, pools.embeddings[pools.null_prompt], backbone, latent_shape, kept)
    check(bool(pairs) or ft.lambda_feat == 0,
          "no block of the student matches the teacher's feature shapes, so feature distillation has nothing to "
          "compare; prune the student from this teacher or set finetune.lambda_feat=0")

    # 3. optimisers, the problem and the update rule (shared with benchmarks/bench_finetune.py).
    training = build_training(cfg, accelerator, student_core, teacher, scheduler, pools, pairs, unlearning, backbone)
    problem, optimizers = training.problem, training.optimizers
    check(validate is None or not problem.sharded, "finetune.validation_every_steps needs DDP or one process (FSDP "
                                                   "shards the student); set it to 0 and sample checkpoints with "
                                                   "`safeprune generate --model RUN/checkpoints/step_N`")
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, training.modules(), training.raw_optimizers())
        start, problem.counts = state["step"], state["counts"]
        if "data" in state:  # stream mode: continue after the images already drawn
            pools.lower.load_state_dict(state["data"])

    # What load_pipeline needs to sample from a checkpoint (generate / evaluate --model RUN/checkpoints/step_N).
    model_record = checkpoint_record(load_plan(student_dir), base_model)

    def checkpoint(step: int, modules: dict, optims: dict) -> Path:
        check_weights(modules, start_max, ft.max_weight_growth, step)  # a bad checkpoint is never written
        data = {"data": pools.lower.state_dict()} if hasattr(pools.lower, "state_dict") else {}
        extra = {"counts": problem.counts, "config": to_dict(cfg), "schedule": method.schedule,
                 "model": model_record, **data}
        return save_step(out / CHECKPOINTS, step, modules, optims, extra=extra, keep=ft.keep_checkpoints)

    # 4. the loop: one method call per iteration; logging and checkpoints on the main process.
    accelerator.wait_for_everyone()  # every process has validated `out` before the main one writes into it
    if main:
        if run is not None:  # the folder is made only now: every input has been read and checked
            run.begin(claim=RUN_FILES, config=to_dict(cfg), inputs=inputs)
        else:
            out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        (out / "concepts.json").write_text(json.dumps([dataclasses.asdict(c) for c in concepts], indent=1))
        _truncate_metrics(out / METRICS, start)
        if run is not None:
            run.save(state="training")
    accelerator.init_trackers("finetune", config=_flat(to_dict(cfg)) if ft.report_to == "wandb" else None,
                              init_kwargs={"tensorboard": {"purge_step": start}, "wandb": {"dir": str(out / "logs")}})
    last_good = str(resume_from) if resume_from else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:  # closes the log file and the bar, then ends training (DDP too)
        stack.callback(_forget_accelerate_settings)
        stack.callback(accelerator.end_training)
        bar = stack.enter_context(tqdm(total=method.total_steps, initial=start, desc=f"finetune {method.label}",
                                       unit="it", disable=not main, dynamic_ncols=True))
        metrics = stack.enter_context(open(out / METRICS, "a")) if main else None
        try:
            for step in range(start, method.total_steps):
                # the paper code's schedule: linear warm-up (the upper lr's counted in upper steps), then constant
                lrs = {"lower": warmup_cosine(step, ft.lr, ft.warmup_steps),
                       "upper": warmup_cosine(method.upper_index(step), ft.upper.lr, ft.upper.warmup_steps)}
                for which, opt in optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = lrs[which]
                logs = method(step, problem, training.update)
                if on_eval is not None and ft.eval_every_steps and main \
                        and _due(step, ft.eval_every_steps, method.total_steps):
                    logs |= {f"eval/{k}": v for k, v in on_eval(step + 1, student_core).items()}
                accelerator.log({**logs, **{f"lr/{k}": lrs[k] for k in optimizers}}, step=step + 1)
                if validate is not None and _due(step, ft.validation_every_steps, method.total_steps):
                    validate(step + 1, accelerator)
                if main:
                    record = {"step": step + 1, **logs, **{f"lr/{k}": lrs[k] for k in optimizers},
                              **problem.counts, "time_s": round(time.perf_counter() - t0, 3)}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.update(1)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items()
                                     if k in ("lower/ft", "upper/cu")}, refresh=False)
                if _due(step, ft.ckpt_every_steps, method.total_steps):
                    accelerator.wait_for_everyone()
                    state = training.checkpoint_state()  # every rank: FSDP gathers the shards here
                    if main:
                        last_good = str(checkpoint(step + 1, *state))
        except (NonFiniteLoss, WeightsDiverged) as err:
            where = f"the last good checkpoint is {last_good}" if last_good else \
                "no checkpoint was written yet (--resume starts again from step 0)"
            raise UserError(f"{err}; stopped, {where}; lower finetune.lr / finetune.upper.lr and resume with "
                            "--resume (or start again with --overwrite)") from err
        bar.close()

        # 5. the result: RUN/model/, a complete pipeline folder with a model card (EMA weights when enabled).
        in_sync, result = training.in_sync(), training.result()  # collectives: every rank
        if main:
            facts = {"method": load_plan(student_dir)["method"],
                     "concepts": [dataclasses.asdict(c) for c in concepts], "recipe": _recipe(cfg)}
            if run is not None:  # claimed before it is written; removed if the run ever trains on
                run.save(result=[MODEL, "summary.json", LINEAGE])
            if (student_dir / LINEAGE).is_file():  # the run folder is a student of the same teacher
                shutil.copyfile(student_dir / LINEAGE, out / LINEAGE)
            model_dir = _save_result(result, student_dir, teacher_dir, base_model, out, facts)
            world = accelerator.num_processes
            summary = {"method": ft.method, "solver": method.solver,
                       "unlearn": ft.unlearn.name if unlearning is not None else None, "steps": method.total_steps,
                       "upper_steps": method.upper_steps, "world_size": world, **in_sync,
                       "counts_per_process": problem.counts,
                       "counts": {k: v * world for k, v in problem.counts.items()},
                       "feature_blocks": [list(p) for p in pairs], "concepts": len(concepts),
                       "wall_s": round(time.perf_counter() - t0, 2), "teacher": str(teacher_dir),
                       "model": str(model_dir.relative_to(out)), **data_info}
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            if finish is not None:
                finish()
            if run is not None:
                run.save(state="finished")
        accelerator.wait_for_everyone()
    return out


def _forget_accelerate_settings() -> None:
    """Accelerate keeps one process-wide state; clear it so a later run in this process may use another
    mixed precision (the demo and the tests run several fine-tunings in one process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _save_result(unet, student_dir: Path, teacher_dir: Path, base_model: str | None, out: Path, facts: dict) -> Path:
    """Write the run's model folder `out`/model: a complete diffusers pipeline (the fine-tuned student + the
    teacher's other components) with its model card, atomically (a crash leaves no folder that looks valid)."""
    from safeprune.models.io import MODEL, load_plan, save_model

    # overwrite: `out` is this run's own folder (checked by _prepare_run_dir); a resumed run replaces its model
    return save_model(unet, out / MODEL, load_plan(student_dir), teacher_dir, base_model,
                      card={**facts, "prune_report": _prune_report(student_dir)}, overwrite=True)


def _prune_report(student_dir: Path) -> dict:
    """The student's prune_report.json (`safeprune prune` writes it beside model/), or {} when there is none."""
    for folder in (student_dir, student_dir.parent, student_dir.parent.parent):
        if (folder / "prune_report.json").is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                return json.loads((folder / "prune_report.json").read_text())
    return {}


def _recipe(cfg: Config) -> dict:
    """The settings a model card lists as the training recipe."""
    ft, method = cfg.finetune, build_method(cfg.finetune)
    recipe = {k: getattr(ft, k) for k in ("method", "max_steps", "batch_size", "grad_accum", "lr", "warmup_steps",
                                          "lambda_diff", "lambda_out", "lambda_feat", "snr_gamma", "mixed_precision")}
    if uses_upper(method):  # the upper level: its loss, optimiser and period
        recipe |= {"unlearn": ft.unlearn.name, "eta": ft.unlearn.eta, "upper lr": ft.upper.lr, "upper every": ft.upper.every}
    if method.solver:
        recipe["solver"] = method.solver
    return {"teacher": cfg.model.teacher or "safeprune toy teacher", **recipe, "seed": cfg.seed}


def _data_info(pools, data, cfg: Config) -> dict:
    """How many images the lower level trains on, for the log and summary.json; warns when a pool samples a
    subset of a larger --data (the pool is encoded once: the rest is never seen)."""
    import warnings

    lower = pools.lower
    if hasattr(lower, "images"):  # stream: fresh images every step (repeats once an epoch ends)
        length = getattr(getattr(lower.images, "source", None), "__len__", None)
        return {"data_mode": "stream", "training_images": None, "source_images": length() if length else None}
    used, available = len(lower), getattr(lower, "source_size", None) or len(lower)
    if data is not None and available > used:
        warnings.warn(f"finetune.data.mode=pool trains on {used} of the {available} images in --data (a random "
                      f"subset, finetune.data.pool={cfg.finetune.data.pool}); raise finetune.data.pool or set "
                      "finetune.data.mode=stream to see them all", stacklevel=1)
    return {"data_mode": "pool", "training_images": used, "source_images": available}


def _validation(cfg: Config, pipe, student, concepts, pools, out: Path, backbone):
    """validate(step, accelerator): draw the validation images with the student (fixed prompts and seeds, so
    grids of different steps compare), save RUN/validation/step_N.png and log them to the tracker.

    Prompts: finetune.validation_prompts, else each suppressed concept and its anchor (suppression and what
    must survive side by side), else the first fine-tuning captions."""
    from safeprune.recipes.generate import generate_images
    from safeprune.viz import make_grid, save_image

    ft = cfg.finetune
    prompts = list(ft.validation_prompts) or list(dict.fromkeys(
        [p for c in concepts for p in (c.target, c.anchor) if p])) or list(dict.fromkeys(pools.lower.captions))[:2]
    prompts = prompts[:8]
    seeds = list(range(ft.validation_seeds))
    sampler = backbone.assemble(pipe, student)  # the family's pipeline; generate_images picks the sampler
    sampler.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its own, not the teacher's

    def validate(step: int, accelerator) -> None:
        was_training = student.training
        student.eval()
        try:
            images = generate_images(sampler, [p for p in prompts for _ in seeds], seeds * len(prompts),
                                     cfg.sample.steps, cfg.sample.guidance, cfg.sample.batch_size, progress=False,
                                     resolution=cfg.sample.resolution)
        finally:
            student.train(was_training)
        rows = [list(images[i * len(seeds):(i + 1) * len(seeds)]) for i in range(len(prompts))]
        (out / VALIDATION).mkdir(parents=True, exist_ok=True)
        save_image(make_grid(rows, [p[:40] for p in prompts], [f"seed {s}" for s in seeds]),
                   out / VALIDATION / f"step_{step:07d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                captions = [f"{p} (seed {s})" for p in prompts for s in seeds]
                tracker.log({"validation": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    return validate
