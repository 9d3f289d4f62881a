"""The diffusion bilevel problem: L_ft (lower level, eq. 8) and L_CU (upper level) on fixed latent pools.

`DiffusionProblem` implements the `Problem` protocol of solvers.py for a student UNet and a frozen teacher:
  lower:  x_t = noised latents of fine-tuning images under their captions; teacher and student predict
          eps (or v) and expose their block outputs; L_ft = l_diff L_diff + l_out L_outKD + l_feat L_featKD.
  upper:  x_t = noised latents of concept images (`upper_images`: or of anchor images, or the student's own
          partial samples under the target prompt, ESD's on-policy x_t: Gandikota et al. 2023, Sec. 3);
          the teacher is run once on a stacked batch for every condition the unlearning loss needs (target,
          anchor, null); the student predicts under the target prompt and regresses onto the unlearning
          target. With `preserve` > 0, L_CU + preserve * || eps_S(x_t, t, r) - eps_T(x_t, t, r) ||^2 for a
          retained prompt r (a random fine-tuning caption) at the same x_t: the upper step may not move what
          the student predicts for prompts without the concept.
Randomness (pool indices, latent samples, noise, timesteps) comes from a CPU generator seeded by
(seed, rank, step, stream), so a step's batch never depends on what ran before it: resumed runs are exact
and `lower_value` can replay the batch that `lower` used. Per-step Python work is a handful of tensor ops;
text embeddings and VAE latents were computed once when the pools were built.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from safeprune.backbones import BACKBONES
from safeprune.data.datasets import LatentPool
from safeprune.errors import UserError, check
from safeprune.losses import LowerLevelLoss
from safeprune.losses.base import mse_per_sample
from safeprune.models.hooks import capture_features
from safeprune.utils import torch_rng


class NonFiniteLoss(UserError):
    """A loss term became nan/inf; raised BEFORE its backward pass, so the weights stay finite."""

    def __init__(self, step: int, stream: str, values: dict[str, float]):
        self.step, self.stream, self.values = step, stream, values
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
        super().__init__(f"the {stream} loss is not finite at step {step + 1} ({bad})")


@dataclass
class Pools:
    """Everything the loop samples from, on the training device."""

    lower: LatentPool  # fine-tuning images
    lower_prompt: torch.Tensor  # (N,) long (CPU): embedding row of each image's caption
    # every prompt the run uses, embedded once: (P, L, D), or a PromptEmbeddings (safeprune.backbones) of P rows
    embeddings: torch.Tensor
    null_prompt: int  # embedding row of the empty prompt
    concept: LatentPool | None = None  # concept images (None when no upper step is taken)
    concept_target: torch.Tensor | None = None  # (M,) long: the target prompt paired with each concept image
    concept_anchor: torch.Tensor | None = None  # (M,) long: its anchor prompt


def step_generator(seed: int, rank: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, rank, step, stream): `torch_rng` keyed in that order."""
    return torch_rng(seed, rank, step, stream)


@dataclass(eq=False)
class DiffusionProblem:
    student: torch.nn.Module  # what the loop calls (may be wrapped by DDP / autocast)
    student_core: torch.nn.Module  # the unwrapped UNet (hooks; no-grad evaluation unless sharded)
    teacher: torch.nn.Module  # frozen, eval mode
    scheduler: object  # training noise scheduler (add_noise, alphas_cumprod, prediction type)
    lower_loss: LowerLevelLoss
    pools: Pools
    unlearning: object | None = None  # a safeprune.unlearning loss; None for distillation only
    batch_size: int = 16
    upper_batch_size: int = 16
    grad_accum: int = 1
    upper_grad_accum: int = 1  # micro-batches per upper step, so its global batch does not follow the GPU count
    seed: int = 0
    rank: int = 0
    teacher_dtype: torch.dtype = torch.float32
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()  # accelerator.backward
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # DDP: skip all-reduce
    sharded: bool = False  # FSDP: student_core holds only shards, so every forward goes through `student`
    counts: dict = field(default_factory=lambda: {"student_fwd": 0, "student_bwd": 0, "teacher_fwd": 0})
    backbone: object = None  # safeprune.backbones family: denoiser call, target, schedule; None = SD 1.x/2.x
    # the upper level's x_t (finetune.upper.images, resolved): concept | anchor (both the concept pool, which
    # build_pools fills with anchor images for `anchor`) | student (partial samples of the student)
    upper_images: str = "concept"
    sample_steps: int = 8  # student x_t: length of the sampler's schedule
    sample_guidance: float = 3.0  # student x_t: classifier-free guidance
    preserve: float = 0.0  # weight of the preservation term on retained prompts (0 = off)

    def __post_init__(self):
        self.device = self.pools.embeddings.device
        self.backbone = self.backbone or BACKBONES["sd"]
        if self.preserve > 0:
            check(not hasattr(self.pools.lower, "attach"), "finetune.upper.preserve draws retained captions from the "
                                                           "fine-tuning pool; set finetune.data.mode=pool or preserve=0")
        self.schedule = self.lower_loss.denoise.schedule  # noising and target of the family (backbones.base)
        pairs = self.lower_loss.feature_kd.pairs if self.lower_loss.needs_features else ()
        self.teacher_blocks = [t for t, _ in pairs]
        self.student_blocks = [s for _, s in pairs]

    # -- batches
    def _noised(self, latents: torch.Tensor, gen: torch.Generator):
        return self.schedule.noised(latents, gen, self.device)  # (noise, timesteps, x_t)

    def _teacher(self, x_t, timesteps, emb) -> torch.Tensor:
        self.counts["teacher_fwd"] += x_t.shape[0]
        return self.backbone.predict(self.teacher, x_t.to(self.teacher_dtype), timesteps,
                                     emb.to(self.teacher_dtype)).float()

    def _lower_terms(self, gen: torch.Generator, train: bool) -> dict[str, torch.Tensor]:
        idx, latents = self.pools.lower.draw(gen, self.batch_size)
        noise, timesteps, x_t = self._noised(latents, gen)
        emb = self.pools.embeddings[self.pools.lower_prompt[idx].to(self.device)]  # (B, L, D)
        feature = self.backbone.feature
        with torch.no_grad(), capture_features(self.teacher, self.teacher_blocks, feature) as teacher_feats:
            teacher_out = self._teacher(x_t, timesteps, emb)
        # No DDP bookkeeping without a backward; FSDP must gather the shards in its wrapper's forward.
        student = self.student if train or self.sharded else self.student_core
        with capture_features(self.student_core, self.student_blocks, feature) as student_feats:
            student_out = self.backbone.predict(student, x_t, timesteps, emb)
        self.counts["student_fwd"] += x_t.shape[0]
        return self.lower_loss(student_out, teacher_out, latents, noise, timesteps, student_feats, teacher_feats)

    @staticmethod
    def _means(step: int, stream: str, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Batch means as floats (one device sync), checked before any backward pass."""
        values = dict(zip(terms, torch.stack([v.detach().mean() for v in terms.values()]).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLoss(step, stream, values)
        return values

    # -- the Problem protocol
    def lower(self, step: int, weight: float = 1.0, stream: str = "lower") -> dict[str, float]:
        gen = step_generator(self.seed, self.rank, step, stream)
        totals: dict[str, float] = {}
        for micro in range(self.grad_accum):
            # DDP all-reduces only on the last micro-batch; forward and backward must both sit in no_sync.
            sync = micro == self.grad_accum - 1
            with contextlib.nullcontext() if sync else self.no_sync():
                terms = self._lower_terms(gen, train=True)
                values = self._means(step, stream, terms)
                self.backward(terms["ft"].mean() * (weight / self.grad_accum))
            self.counts["student_bwd"] += self.batch_size
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.grad_accum
        return totals

    @torch.no_grad()
    def lower_value(self, step: int, stream: str = "lower") -> float:
        gen = step_generator(self.seed, self.rank, step, stream)
        total = 0.0
        for _ in range(self.grad_accum):
            total += self._means(step, stream, self._lower_terms(gen, train=False))["ft"] / self.grad_accum
        return total

    def upper(self, step: int, weight: float = 1.0) -> dict[str, float]:
        gen = step_generator(self.seed, self.rank, step, "upper")
        totals: dict[str, float] = {}
        for micro in range(self.upper_grad_accum):  # as in `lower`: all-reduce on the last micro-batch only
            sync = micro == self.upper_grad_accum - 1
            with contextlib.nullcontext() if sync else self.no_sync():
                loss = self._upper_terms(gen)
                values = self._means(step, "upper", {"cu": loss})
                self.backward(loss.mean() * (weight / self.upper_grad_accum))
            self.counts["student_bwd"] += self.upper_batch_size
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.upper_grad_accum
        return totals

    def _student_xt(self, latents: torch.Tensor, target_rows: torch.Tensor, gen: torch.Generator):
        """(timesteps, x_t): k ~ U{0..n-1} guided steps of the student itself from x_T ~ N(0, I) under the target
        prompts (ESD's quick_sample_till_t; safeprune.erasure.esd_paper.sample_xt), no gradients, on the family's
        n-step sampler over the training schedule: DDIM (eta 0) for DDPM families, flow-matching Euler for SD3 /
        Flux. The sampler is built afresh per draw (flow-matching schedulers count their steps)."""
        from safeprune.erasure.esd_paper import sample_xt

        sampler = self.backbone.sampling_scheduler(self.scheduler, self.student_core, self.sample_steps,
                                                   tuple(latents.shape[1:]))
        stop = int(torch.randint(self.sample_steps, (1,), generator=gen))
        emb = self.pools.embeddings
        null = emb[torch.tensor([self.pools.null_prompt]).to(self.device)]  # (1, L, D)
        with torch.no_grad():
            x_t, timesteps = sample_xt(self.student_core, sampler, emb[target_rows.to(self.device)], null, stop,
                                       self.sample_guidance, gen, self.backbone, latents.shape[1:])
        self.counts["student_sample_fwd"] = self.counts.get("student_sample_fwd", 0) \
            + self.backbone.guidance_rows * stop * len(target_rows)
        return timesteps, x_t

    def _preservation(self, x_t, timesteps, gen: torch.Generator) -> torch.Tensor:
        """Per-sample || eps_S(x_t, t, r) - eps_T(x_t, t, r) ||^2 (B,), r a random retained (fine-tuning) caption."""
        rows = self.pools.lower_prompt[torch.randint(len(self.pools.lower_prompt), (x_t.shape[0],), generator=gen)]
        emb = self.pools.embeddings[rows.to(self.device)]
        with torch.no_grad():
            teacher_out = self._teacher(x_t, timesteps, emb)
        self.counts["student_fwd"] += x_t.shape[0]
        return mse_per_sample(self.backbone.predict(self.student, x_t, timesteps, emb), teacher_out)

    def upper_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
        """The next upper micro-batch drawn from `gen`: (x_t, timesteps, prompt rows by condition, the unlearning
        target); the target is built from teacher predictions at x_t (no gradients)."""
        pools, n = self.pools, self.upper_batch_size
        idx, latents = pools.concept.draw(gen, n)
        if self.upper_images == "student":  # the images only pick the concepts; x_t is the student's own
            timesteps, x_t = self._student_xt(latents, pools.concept_target[idx], gen)
        else:
            _, timesteps, x_t = self._noised(latents, gen)
        rows = {"target": pools.concept_target[idx], "anchor": pools.concept_anchor[idx],
                "null": torch.full((n,), pools.null_prompt, dtype=torch.long)}
        conditions = self.unlearning.teacher_conditions
        k = len(conditions)
        # One teacher call for all conditions: (k*B, ...) stacked in condition order.
        teacher_emb = pools.embeddings[torch.cat([rows[c] for c in conditions]).to(self.device)]
        with torch.no_grad():
            # predictions in the family's space (eps, v or flow velocity): the targets are affine combinations
            # with weights summing to 1, valid in each of them (safeprune.backbones.base)
            eps = self._teacher(x_t.repeat(k, 1, 1, 1), timesteps.repeat(k), teacher_emb).chunk(k)
        return x_t, timesteps, rows, self.unlearning.target(dict(zip(conditions, eps)))

    def _upper_terms(self, gen: torch.Generator) -> torch.Tensor:
        """Per-sample L_CU (B,) on the next concept micro-batch drawn from `gen`."""
        x_t, timesteps, rows, target = self.upper_batch(gen)
        student_eps = self.backbone.predict(self.student, x_t, timesteps,
                                            self.pools.embeddings[rows["target"].to(self.device)])
        self.counts["student_fwd"] += x_t.shape[0]
        loss = self.unlearning(student_eps, target)  # (B,)
        if self.preserve > 0:  # drawn after everything above: preserve = 0 keeps today's batches bit for bit
            loss = loss + self.preserve * self._preservation(x_t, timesteps, gen)
        return loss
