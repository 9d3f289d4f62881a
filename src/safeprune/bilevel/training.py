"""What a fine-tuning run steps: the diffusion problem, its two optimisers, the EMA copy and the update rule.

`build_training` wires a loaded student/teacher pair and its pools into a `Training` (shared by
recipes/finetune.py and benchmarks/gpu_step_cost.py). The lower optimiser moves every weight, the upper one
the parameters its unlearning loss selects (`safeprune.unlearning.select_parameters`); what data-parallel
and sharded training change in that two-optimiser step is in `safeprune.bilevel.distributed`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from safeprune.bilevel.distributed import (
    StateDictView,
    check_shardable,
    clip_grad_norm_,
    in_sync,
    is_sharded,
    optimizer_tensors,
)
from safeprune.bilevel.pools import upper_images
from safeprune.bilevel.problem import DiffusionProblem
from safeprune.config import Config
from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss
from safeprune.optim import build_optimizer
from safeprune.pruning import reapply_masks
from safeprune.unlearning import select_parameters
from safeprune.utils import DTYPES


@dataclass(eq=False)
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
        if self.problem.sharded:
            return {"student": StateDictView(self.accelerator, self.problem.student)}
        return {"student": self.problem.student_core} | ({"ema": self.ema} if self.ema is not None else {})

    def raw_optimizers(self) -> dict:
        """The optimisers unwrapped from Accelerate, for state dicts (FSDP: full-state views, as `modules`)."""
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
        if self.problem.sharded:
            return StateDictView(self.accelerator, self.problem.student).gather()
        return self.ema if self.ema is not None else self.problem.student_core

    def in_sync(self) -> dict:
        """{"params_in_sync", "optimizer_states_in_sync"}: whether every rank holds bit-identical weights and
        moments of both optimisers (DDP's promise, checked; None under FSDP, where ranks hold shards)."""
        moments = [t for o in self.optimizers.values() for t in optimizer_tensors(o.optimizer)]
        return {"params_in_sync": in_sync(self.accelerator, list(self.problem.student_core.parameters())),
                "optimizer_states_in_sync": in_sync(self.accelerator, moments)}


def build_training(cfg: Config, accelerator, student_core, teacher, scheduler, pools, pairs, unlearning,
                   backbone=None) -> Training:
    """Optimisers and the diffusion problem for a loaded student/teacher pair and its pools; `backbone` is the
    family (safeprune.backbones; None = SD 1.x/2.x)."""
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
        lower_loss=LowerLevelLoss(DenoisingLoss(scheduler, ft.snr_gamma, ft.snr_weighting,
                                                getattr(backbone, "timestep_density", "uniform")),
                                  FeatureKD(tuple(pairs)),
                                  ft.lambda_diff, ft.lambda_out, ft.lambda_feat),
        pools=pools, unlearning=unlearning, batch_size=ft.batch_size, upper_batch_size=ft.upper.batch_size,
        grad_accum=ft.grad_accum, upper_grad_accum=ft.upper.grad_accum, seed=cfg.seed, rank=accelerator.process_index,
        teacher_dtype=DTYPES[ft.teacher_dtype], backward=accelerator.backward,
        no_sync=lambda: accelerator.no_sync(student), sharded=is_sharded(accelerator), backbone=backbone,
        upper_images=upper_images(ft, unlearning), sample_steps=ft.upper.sample_steps,
        sample_guidance=ft.upper.sample_guidance, preserve=ft.upper.preserve)
    return Training(accelerator, problem, dict(zip(names, prepared)), ema, ft.max_grad_norm, ft.ema_decay)
