"""`safeprune finetune`: distil a pruned student from its teacher and suppress concepts (seed paper Sec. 3).

One loop, top to bottom:
  1. load the frozen teacher pipeline and the pruned student; check they fit (a dry forward pass);
  2. build the fixed pools once: VAE latents of fine-tuning and concept images, text embeddings of every
     caption and concept prompt (method notes: "embeddings of fixed prompts computed once");
  3. run the method's step function (`safeprune.bilevel`: distill | two_stage | bilevel alternating/penalty)
     under Accelerate (device, mixed precision, DDP), with per-step metrics, TensorBoard, a progress bar,
     and atomic checkpoints every `finetune.ckpt_every_steps`;
  4. save the student so the run folder is itself a pruned-UNet folder that `safeprune.load_pipeline` loads.

Run folder: the saved student (config.json, plan.json, safeprune.json, diffusion_pytorch_model.safetensors),
config.yaml, concepts.json ([{target, anchor}] suppressed), summary.json (method, steps, upper_steps,
world_size, params_in_sync / optimizer_states_in_sync (bit-identical on every DDP rank; null under FSDP),
pass counts, matched feature blocks, wall time), checkpoints/step_NNNNNNN/, logs/ (TensorBoard),
and metrics.jsonl, one line per iteration with the keys present that step:
  step; lower/diff, lower/out_kd, lower/feat_kd, lower/ft (batch means of eq. 1, 3, 4, 8); upper/cu (L_CU);
  outer/ft, outer/lambda, outer/gap (penalty outer steps); lr/lower, lr/upper; student_fwd, student_bwd,
  teacher_fwd (cumulative passes of this process, counted in images); time_s (since this process started).
Exact resume: a step's randomness depends only on (seed, rank, step), and checkpoints hold the weights,
both optimisers and the pass counters, so `--resume` continues bit-for-bit on CPU.
Multi-GPU: `accelerate launch` with configs/accelerate/*.yaml (DDP or FSDP); what sharding changes in the
two-optimiser step (evaluation through the wrapper, clipping, gathered checkpoints) is in safeprune.bilevel.distributed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from safeprune.config import Config, FinetuneConfig, save_config, to_dict
from safeprune.errors import UserError, check

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Config keys that may change when a run is resumed (e.g. a lower lr after a divergence, more steps);
# any other difference would make the resumed run a different run.
RESUMABLE_CHANGES = {f"finetune.{k}" for k in ("max_steps", "ckpt_every_steps", "keep_checkpoints",
                                               "eval_every_steps", "lr", "upper.lr")} | {"paths.out"}


def run(cfg: Config, args) -> int:
    """CLI target of `safeprune finetune`: its flags fill cfg.paths, cfg.model.teacher and finetune.concepts."""
    print(finetune(cfg, resume=args.resume, overwrite=args.overwrite, allow_other_teacher=args.allow_other_teacher))
    return 0


# ----------------------------------------------------------------------------- schedules (pure in step)


def lower_lr(cfg: FinetuneConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant (the paper code's schedule)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def _due(step: int, every: int, total: int) -> bool:
    """Whether iteration `step` (0-based) ends a period of `every` iterations, or ends the run: checkpoints and
    evaluations also happen at the last step (two_stage's unlearning may end between two periods)."""
    return (step + 1) % every == 0 or step + 1 == total


# ----------------------------------------------------------------------------- run folder


def _checkpoints(out: Path) -> list[Path]:
    from safeprune.checkpoint import step_folders

    return step_folders(out / CHECKPOINTS)


# what a run writes at its top level besides the result (claimed in the run marker before it is written)
RUN_FILES = ("config.yaml", "concepts.json", METRICS, "logs", CHECKPOINTS, "summary.json")
LINEAGE = "lineage.json"  # written by `safeprune prune`: the fingerprint of the teacher the student was pruned from


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"finetune": {"lr": 1}} -> {"finetune.lr": 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= _flat(value, name + ".") if isinstance(value, dict) else {name: value}
    return out


def _prepare_run_dir(out: Path, resume: bool, cfg: Config, total_steps: int, overwrite: bool = False,
                     inputs: dict | None = None):
    """Validate `out` for a fresh run, an `--overwrite` or a resume (safeprune.runs); returns the RunFolder
    and the checkpoint to resume from (None: from step 0, e.g. a run killed before its first checkpoint)."""
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
    from safeprune.models.io import load_plan
    from safeprune.pruning import apply_plan

    ft = cfg.finetune
    plan = load_plan(student_dir)
    base = meta_unet(plan["base_config"])
    student = apply_plan(base, plan) if plan["method"] != "none" else base
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent = ft.resolution // vae_scale if ft.resolution else pipe.unet.config.sample_size
    encoders = sum(p.numel() for m in (pipe.vae, pipe.text_encoder) for p in m.parameters())
    check_fits(estimate_memory(cfg, student, meta_unet(dict(pipe.unet.config)), latent_size=latent,
                               encoder_params=encoders), device)


# ----------------------------------------------------------------------------- models


@contextlib.contextmanager
def _no_loading_bars():
    """Hide diffusers'/transformers' per-component loading bars (noise around the training bar); restore after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _load_teacher(path: Path):
    from diffusers import StableDiffusionPipeline

    check((path / "model_index.json").is_file(),
          f"teacher folder {str(path)!r} is not a diffusers pipeline (no model_index.json); pass --teacher PATH "
          "to a Stable Diffusion pipeline folder")
    try:
        with _no_loading_bars():
            return StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True,
                                                           use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"cannot load the teacher pipeline from {str(path)!r}: {str(err).splitlines()[0]}") from err


@torch.no_grad()
def match_features(teacher, student, null_embedding: torch.Tensor) -> list[tuple[str, str]]:
    """Check that student and teacher fit (same inputs, same output shape) and pair their feature maps.

    One dry forward pass on a (1, C, h, w) input: a student that cannot take the teacher's latents or text
    embeddings is a user error; block pairs whose shapes differ (e.g. a pruned block width) are dropped.
    """
    from safeprune.models.hooks import capture_features, match_blocks

    cfg = teacher.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    x = torch.randn(1, cfg.in_channels, *size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])  # any valid timestep: only shapes are compared
    emb = null_embedding[None]
    pairs = match_blocks(teacher, student)
    device, dtype = next(teacher.parameters()).device, next(teacher.parameters()).dtype
    with capture_features(teacher, [p[0] for p in pairs]) as t_feats:
        t_out = teacher(x.to(device, dtype), t.to(device), encoder_hidden_states=emb.to(device, dtype)).sample
    s_device = next(student.parameters()).device
    try:
        with capture_features(student, [p[1] for p in pairs]) as s_feats:
            s_out = student(x.to(s_device), t.to(s_device), encoder_hidden_states=emb.to(s_device)).sample
    except (RuntimeError, ValueError, AttributeError) as err:
        raise UserError(f"student and teacher do not match (the student cannot take the teacher's latents and text "
                        f"embeddings: {str(err).splitlines()[0][:160]}); prune the student from this teacher") from err
    check(s_out.shape == t_out.shape, f"student and teacher do not match: the student predicts {tuple(s_out.shape)} "
                                      f"but the teacher {tuple(t_out.shape)}; prune the student from this teacher")
    return [(tn, sn) for tn, sn in pairs if t_feats[tn].shape == s_feats[sn].shape]


# ----------------------------------------------------------------------------- data


def _build_pools(cfg: Config, pipe, unlearning, data, concept_data, device):
    """Latent pools + one embedding table for every prompt; returns (Pools, the concepts suppressed)."""
    from safeprune.bilevel.problem import Pools
    from safeprune.data.datasets import embed_prompts, encode_pool, open_image_captions
    from safeprune.data.stream import data_mode, open_stream_pool
    from safeprune.data.toyworld import ToyWorld
    from safeprune.unlearning.concepts import derive_concepts, pair_images

    ft = cfg.finetune
    world = ToyWorld(cfg.toyworld, cfg.seed)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    # finetune.resolution, else the image side the VAE maps onto the UNet's native latent size
    size = ft.resolution or pipe.unet.config.sample_size * vae_scale
    missing = [flag for flag, given, needed in (("--data", data, True), ("--concept-data", concept_data,
                                                unlearning is not None)) if needed and given is None]
    if missing and size != cfg.toyworld.size:  # legal, but a teacher of another image size is surely not a toy
        warnings.warn(f"no {' / '.join(missing)} given: fine-tuning a {size} px teacher on the toy world's "
                      f"{cfg.toyworld.size} px images; pass your own image folder or dataset", stacklevel=1)
    vae = pipe.vae.to(device).eval()

    sources = {"streaming": ft.data.streaming, "hub": ft.data.hub_data}
    if data_mode(ft, data) == "stream":  # fresh images every step, VAE-encoded per batch (safeprune.data.stream)
        lower = open_stream_pool(data, ft, world=world, vae=vae, tokenizer=pipe.tokenizer,
                                 text_encoder=pipe.text_encoder, resolution=size, seed=cfg.seed, device=device,
                                 dtype=DTYPES[ft.teacher_dtype])
    else:
        lower_set = open_image_captions(data, world=world, split="finetune", n_toy=ft.data.pool, size=size, **sources)
        lower = encode_pool(lower_set, ft.data.pool, vae, seed=cfg.seed, device=device)

    concepts, concept, pairing = [], None, []
    if unlearning is not None:
        concept_set = open_image_captions(concept_data, world=world, split="concept", n_toy=ft.data.concept_pool, size=size,
                                          **sources)
        concept = encode_pool(concept_set, ft.data.concept_pool, vae, seed=cfg.seed + 1, device=device)
        concepts = list(ft.concepts)
        if concepts:
            pairing = pair_images(concepts, concept.captions)
        else:  # derived from the concept images' captions (see safeprune.unlearning.concepts)
            concepts, pairing = derive_concepts(concept.captions, concept.labels, world.forbidden)

    prompts = list(dict.fromkeys(["", *lower.captions, *(c.target for c in concepts), *(c.anchor for c in concepts)]))
    row = {p: i for i, p in enumerate(prompts)}
    embeddings = embed_prompts(prompts, pipe.tokenizer, pipe.text_encoder.to(device).eval(), device=device)
    lower_prompt = torch.tensor([row[c] for c in lower.captions], dtype=torch.long)
    if hasattr(lower, "attach"):  # stream: rows that each draw fills with its own captions' embeddings
        embeddings, lower_prompt = lower.attach(embeddings)
    pools = Pools(lower=lower, lower_prompt=lower_prompt, embeddings=embeddings,
                  null_prompt=row[""])
    if concept is not None:
        pools.concept = concept
        pools.concept_target = torch.tensor([row[concepts[k].target] for k in pairing])
        pools.concept_anchor = torch.tensor([row[concepts[k].anchor] for k in pairing])
    return pools, concepts


# ----------------------------------------------------------------------------- optimisers and updates


@dataclasses.dataclass(eq=False)
class Training:
    """What a run steps: the problem, its two optimisers (Accelerate-prepared), the EMA copy, the update rule."""

    accelerator: object
    problem: object  # safeprune.bilevel.problem.DiffusionProblem
    optimizers: dict  # "lower" (every weight) and, when the method unlearns, "upper"
    ema: torch.nn.Module | None
    max_grad_norm: float
    ema_decay: float

    def update(self, which: str) -> None:
        """Clip, step one optimiser, clear EVERY gradient (an upper step's gradients outside its parameter
        set must not leak into the next lower step), keep pruned weights at zero, update the EMA."""
        from safeprune.bilevel.distributed import clip_grad_norm_
        from safeprune.pruning import reapply_masks

        student, opt = self.problem.student_core, self.optimizers[which]
        if self.max_grad_norm > 0:  # the norm of this optimiser's parameters only (FSDP: over all shards)
            clip_grad_norm_(self.accelerator, [p for g in opt.param_groups for p in g["params"]], self.max_grad_norm,
                            optimizer=opt)
        opt.step()
        student.zero_grad(set_to_none=True)
        reapply_masks(student)
        if self.ema is not None:  # hand-written: one fused lerp; a module (not EMAModel) so it checkpoints as one
            torch._foreach_lerp_(list(self.ema.parameters()), list(student.parameters()), 1.0 - self.ema_decay)

    def modules(self) -> dict:
        """What checkpoints hold; under FSDP views that gather / scatter full weights (see bilevel.distributed)."""
        from safeprune.bilevel.distributed import StateDictView

        if self.problem.sharded:
            return {"student": StateDictView(self.accelerator, self.problem.student)}
        return {"student": self.problem.student_core} | ({"ema": self.ema} if self.ema is not None else {})

    def raw_optimizers(self) -> dict:
        """The optimisers unwrapped from Accelerate, for state dicts (FSDP: full-state views, as `modules`)."""
        from safeprune.bilevel.distributed import StateDictView

        if self.problem.sharded:
            return {k: StateDictView(self.accelerator, self.problem.student, o.optimizer)
                    for k, o in self.optimizers.items()}
        return {k: o.optimizer for k, o in self.optimizers.items()}

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(modules, optimisers) ready for `save_checkpoint`. A collective under FSDP: call it on every rank."""
        modules, optimizers = self.modules(), self.raw_optimizers()
        for item in [*modules.values(), *optimizers.values()]:
            if hasattr(item, "gather"):
                item.gather()
        return modules, optimizers

    def result(self):
        """What the run folder saves: the EMA copy, else the student. A collective under FSDP (every rank)."""
        from safeprune.bilevel.distributed import StateDictView

        if self.problem.sharded:
            return StateDictView(self.accelerator, self.problem.student).gather()
        return self.ema if self.ema is not None else self.problem.student_core

    def in_sync(self) -> dict:
        """{"params_in_sync", "optimizer_states_in_sync"}: whether every rank holds bit-identical weights and
        moments of both optimisers (DDP's promise, checked; None under FSDP, where ranks hold shards)."""
        from safeprune.bilevel.distributed import in_sync, optimizer_tensors

        moments = [t for o in self.optimizers.values() for t in optimizer_tensors(o.optimizer)]
        return {"params_in_sync": in_sync(self.accelerator, list(self.problem.student_core.parameters())),
                "optimizer_states_in_sync": in_sync(self.accelerator, moments)}


def build_training(cfg: Config, accelerator, student_core, teacher, scheduler, pools, pairs, unlearning) -> Training:
    """Optimisers and the diffusion problem for a loaded student/teacher pair and its pools."""
    from safeprune.bilevel.distributed import check_shardable, is_sharded
    from safeprune.bilevel.problem import DiffusionProblem
    from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss
    from safeprune.optim import build_optimizer
    from safeprune.unlearning import select_parameters

    ft = cfg.finetune
    check_shardable(accelerator, student_core, ft.ema_decay)
    if ft.gradient_checkpointing:
        student_core.enable_gradient_checkpointing()
    # The lower level moves every weight; the upper level those its unlearning loss selects.
    # finetune.optimizer: fused AdamW (default) or 8-bit AdamW, for both levels (safeprune.optim).
    params = [p for p in student_core.parameters() if p.requires_grad]
    optimizers = {"lower": build_optimizer(ft.optimizer, params, ft.lr, ft.weight_decay)}
    if unlearning is not None:
        optimizers["upper"] = build_optimizer(ft.optimizer, select_parameters(student_core, unlearning.params),
                                              ft.upper.lr, ft.weight_decay)
    names = list(optimizers)
    # One call for the student and BOTH optimisers: Accelerate wraps each, and FSDP re-points their params.
    student, *prepared = accelerator.prepare(student_core, *optimizers.values())
    ema = copy.deepcopy(student_core).requires_grad_(False) if ft.ema_decay > 0 else None
    problem = DiffusionProblem(
        student=student, student_core=student_core, teacher=teacher, scheduler=scheduler,
        lower_loss=LowerLevelLoss(DenoisingLoss(scheduler, ft.snr_gamma), FeatureKD(tuple(pairs)),
                                  ft.lambda_diff, ft.lambda_out, ft.lambda_feat),
        pools=pools, unlearning=unlearning, batch_size=ft.batch_size, upper_batch_size=ft.upper.batch_size,
        grad_accum=ft.grad_accum, seed=cfg.seed, rank=accelerator.process_index,
        teacher_dtype=DTYPES[ft.teacher_dtype], backward=accelerator.backward,
        no_sync=lambda: accelerator.no_sync(student), sharded=is_sharded(accelerator))
    return Training(accelerator, problem, dict(zip(names, prepared)), ema, ft.max_grad_norm, ft.ema_decay)


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
    from safeprune.bilevel import build_method, uses_upper
    from safeprune.models.shipped import teacher_path
    from safeprune.unlearning import build_unlearning

    check(bool(cfg.paths.student) and bool(cfg.paths.out),
          "safeprune finetune needs --student DIR (from `safeprune prune`) and --out DIR (the run folder)")
    ft = cfg.finetune
    out, student = Path(cfg.paths.out), Path(cfg.paths.student)
    data, concept_data = cfg.paths.data or None, cfg.paths.concept_data or None
    method = build_method(ft)  # validates method / solver / budgets before anything heavy happens
    unlearning = build_unlearning(ft.unlearn.name, ft.unlearn) if uses_upper(method) else None
    check(student.is_dir(), f"student folder {str(student)!r} not found; create one with `safeprune prune --out DIR`")
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
    with lock(out, "finetune") if _is_main_rank() else contextlib.nullcontext():
        run, resume_from = _prepare_run_dir(out, resume, cfg, method.total_steps, overwrite, inputs)
        return _train(cfg, method, unlearning, student, teacher_dir or teacher_path(), base_model, out, data,
                      concept_data, resume_from, on_eval, run=run, inputs=inputs,
                      allow_other_teacher=allow_other_teacher)


def _train(cfg, method, unlearning, student_dir, teacher_dir, base_model, out, data, concept_data, resume_from,
           on_eval, *, run=None, inputs=None, allow_other_teacher=False):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from safeprune.bilevel.problem import NonFiniteLoss
    from safeprune.checkpoint import WeightsDiverged, check_weights, load_checkpoint, max_abs, save_step
    from safeprune.models.io import check_prediction_type, load_unet
    from safeprune.utils import fingerprint, resolve_device, seed_everything

    ft = cfg.finetune
    accelerator = Accelerator(cpu=resolve_device(cfg.device).type == "cpu", mixed_precision=ft.mixed_precision,
                              log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    device, main = accelerator.device, accelerator.is_main_process
    seed_everything(cfg.seed)

    # 1. models: the frozen teacher (eval, no grad, optionally low precision) and the trainable student.
    pipe = _load_teacher(teacher_dir)
    check_prediction_type(pipe.scheduler.config, cfg.model.prediction_type, cfg.model.teacher or teacher_dir)
    inputs = {**(inputs or {}), "teacher_fingerprint": fingerprint(pipe.unet)}
    _check_lineage(student_dir, inputs["teacher_fingerprint"], allow_other_teacher)
    if run is not None and run.marker:
        _check_inputs(run.marker.get("inputs") or {}, inputs)
    _check_memory(cfg, student_dir, pipe, device)
    student_core = load_unet(student_dir).to(device).train()
    start_max = max_abs({"student": student_core})  # the bound of check_weights (before any resumed weights)
    teacher = pipe.unet.to(device).eval().requires_grad_(False)
    if ft.teacher_dtype != "fp32":
        teacher = teacher.to(DTYPES[ft.teacher_dtype])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # 2. pools and embeddings, once; the VAE and text encoder are not needed afterwards.
    pools, concepts = _build_pools(cfg, pipe, unlearning, data, concept_data, device)
    del pipe
    pairs = match_features(teacher, student_core, pools.embeddings[pools.null_prompt])
    check(bool(pairs) or ft.lambda_feat == 0,
          "no block of the student matches the teacher's feature shapes, so feature distillation has nothing to "
          "compare; prune the student from this teacher or set finetune.lambda_feat=0")

    # 3. optimisers, the problem and the update rule (shared with benchmarks/bench_finetune.py).
    training = build_training(cfg, accelerator, student_core, teacher, scheduler, pools, pairs, unlearning)
    problem, optimizers = training.problem, training.optimizers
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, training.modules(), training.raw_optimizers())
        start, problem.counts = state["step"], state["counts"]
        if "data" in state:  # stream mode: continue after the images already drawn
            pools.lower.load_state_dict(state["data"])

    def checkpoint(step: int, modules: dict, optims: dict) -> Path:
        check_weights(modules, start_max, ft.max_weight_growth, step)  # a bad checkpoint is never written
        data = {"data": pools.lower.state_dict()} if hasattr(pools.lower, "state_dict") else {}
        return save_step(out / CHECKPOINTS, step, modules, optims,
                         extra={"counts": problem.counts, "config": to_dict(cfg), **data}, keep=ft.keep_checkpoints)

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
    accelerator.init_trackers("finetune", init_kwargs={"tensorboard": {"purge_step": start}})
    last_good = str(resume_from) if resume_from else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:  # closes the log file and the bar, then ends training (DDP too)
        stack.callback(_forget_accelerate_settings)
        stack.callback(accelerator.end_training)
        bar = stack.enter_context(tqdm(total=method.total_steps, initial=start, desc=f"finetune {_method_name(ft)}",
                                       unit="it", disable=not main, dynamic_ncols=True))
        metrics = stack.enter_context(open(out / METRICS, "a")) if main else None
        try:
            for step in range(start, method.total_steps):
                lrs = {"lower": lower_lr(ft, step), "upper": ft.upper.lr}
                for which, opt in optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = lrs[which]
                logs = method(step, problem, training.update)
                if on_eval is not None and ft.eval_every_steps and main \
                        and _due(step, ft.eval_every_steps, method.total_steps):
                    logs |= {f"eval/{k}": v for k, v in on_eval(step + 1, student_core).items()}
                accelerator.log(logs, step=step + 1)
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

        # 5. the result: the run folder becomes a saved pruned-UNet folder (EMA weights when enabled).
        in_sync, result = training.in_sync(), training.result()  # collectives: every rank
        if main:
            world = accelerator.num_processes
            summary = {"method": ft.method, "solver": ft.solver.name if ft.method == "bilevel" else None,
                       "unlearn": ft.unlearn.name if unlearning is not None else None, "steps": method.total_steps,
                       "upper_steps": method.upper_steps, "world_size": world, **in_sync,
                       "counts_per_process": problem.counts,
                       "counts": {k: v * world for k, v in problem.counts.items()},
                       "feature_blocks": [list(p) for p in pairs], "concepts": len(concepts),
                       "wall_s": round(time.perf_counter() - t0, 2), "teacher": str(teacher_dir)}
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            _save_result(result, student_dir, base_model, out, run)
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


def _method_name(ft: FinetuneConfig) -> str:
    return f"bilevel/{ft.solver.name}" if ft.method == "bilevel" else ft.method


def _save_result(unet, student_dir: Path, base_model: Path | None, out: Path, run=None) -> None:
    """Make `out` a saved pruned-UNet folder: the student's plan and base config, the fine-tuned weights.

    Written into a temporary folder inside `out`, then moved in with config.json last: `load_unet`
    recognises the folder by config.json, so a crash never leaves a half-saved model that looks valid.
    """
    import os
    import tempfile

    from safeprune.models.io import load_plan, write_unet

    plan = load_plan(student_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".result.", dir=out))
    try:
        write_unet(unet, tmp, plan, plan["base_config"], base_model)
        if (student_dir / LINEAGE).is_file():  # the result is a student of the same teacher
            shutil.copyfile(student_dir / LINEAGE, tmp / LINEAGE)
        if run is not None:  # claimed before the files move in; removed if the run ever trains on
            run.save(result=sorted({p.name for p in tmp.iterdir()} | {"summary.json"}))
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            path.chmod(0o644)  # safetensors writes 0600; a saved model should be as shareable as its folder
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
