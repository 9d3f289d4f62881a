"""The fine-tuning methods as per-iteration step functions: distill, two-stage, and the bilevel solvers.

Bilevel problem (seed paper Sec. 4): min_theta L_CU(theta)  s.t.  theta in argmin L_ft(theta).

- `Distill`      — the lower level only: one L_ft step per iteration.
- `Alternating`  — the released code's first-order scheme: one set of weights, two optimisers; a lower
                   step every iteration and an upper (L_CU) step after every K-th iteration.
- `Penalty`      — the paper's value-function penalty: K lower steps, then an outer step along
                   grad L_CU + lambda grad L_ft (lambda constant or linearly scheduled) with the upper
                   optimiser. theta and vartheta share one space, so the K lower steps stand in for the
                   inner problem (vartheta -> argmin L_ft) and the outer gradient has no vartheta term
                   (seed paper Sec. 4). The constraint gap L_ft(theta_after) - L_ft(theta_before) of the outer step, on
                   one batch, is logged: how far the outer step left the lower level's solution set.
- `TwoStage`     — the baseline: `distill` for N iterations, then L_CU alone for M iterations
                   (M defaults to the bilevel methods' number of upper steps, so the budgets match).

Upper and outer steps move only the parameters the unlearning loss selects (e.g. `esd_xattn`: cross-attention).
Each method is a frozen dataclass called as `method(step, problem, update) -> logged scalars` and is a
pure function of `step` given its `schedule` (the stage boundary of two-stage, a varying lambda's span, K), so a
resumed run replays the same schedule; checkpoints store `schedule` and `--resume` refuses to change it.
`problem` only accumulates gradients (see `Problem`); `update(which)` applies the `lower` or `upper` optimiser
and clears them.
That split lets the same code solve a 2-D quadratic in the tests and a UNet in the recipe.

`METHODS` (the `finetune.method` values) and `SOLVERS` (`finetune.solver`, for `bilevel`) map each name to
the class's `from_config(finetune section)`; `build_method` looks the name up. Each method's `label` names
it in progress bars and summary.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from safeprune.errors import check, choose


class Problem(Protocol):
    def lower(self, step: int, weight: float = 1.0, stream: str = "lower") -> dict[str, float]:
        """Add weight * grad L_ft on this (step, stream)'s batch to the gradients; return the term means."""

    def upper(self, step: int, weight: float = 1.0) -> dict[str, float]:
        """Add weight * grad L_CU on this step's concept batch to the gradients; return {"cu": mean}."""

    def lower_value(self, step: int, stream: str = "lower") -> float:
        """L_ft on the same batch that `lower(step, stream=stream)` used, without gradients."""


Update = Callable[[str], None]  # "lower" | "upper": clip, optimiser step, clear every gradient, re-mask


def _prefixed(prefix: str, logs: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in logs.items()}


@dataclass(frozen=True)
class Distill:
    max_steps: int

    label = "distill"
    solver = None  # the `finetune.solver` it runs (bilevel methods only)

    @classmethod
    def from_config(cls, cfg) -> Distill:
        return cls(cfg.max_steps)

    @property
    def total_steps(self) -> int:
        return self.max_steps

    @property
    def upper_steps(self) -> int:
        return 0

    @property
    def schedule(self) -> dict:
        """What decides each step's work besides `step` (see the module doc; a resume must not change it)."""
        return {}

    def upper_index(self, step: int) -> int:
        """How many upper (outer) steps come before iteration `step`: the clock of the upper lr's warm-up."""
        return 0

    def __call__(self, step: int, problem: Problem, update: Update) -> dict[str, float]:
        logs = _prefixed("lower", problem.lower(step))
        update("lower")
        return logs


@dataclass(frozen=True)
class _EveryK:
    """A solver with one upper (outer) step per `every` lower steps, over `max_steps` lower steps."""

    max_steps: int
    every: int  # K

    @property
    def total_steps(self) -> int:
        return self.max_steps

    @property
    def upper_steps(self) -> int:
        return self.max_steps // self.every

    @property
    def schedule(self) -> dict:
        return {"every": self.every}

    def upper_index(self, step: int) -> int:
        return step // self.every  # the upper step of iteration K*i - 1 is the i-th (0-based: i - 1)


@dataclass(frozen=True)
class Alternating(_EveryK):
    """K = an upper step after every K-th lower step."""

    label = "bilevel/alternating"
    solver = "alternating"  # the `finetune.solver` it runs (bilevel methods only)

    @classmethod
    def from_config(cls, cfg) -> Alternating:
        return cls(cfg.max_steps, cfg.upper.every)

    def __call__(self, step: int, problem: Problem, update: Update) -> dict[str, float]:
        logs = _prefixed("lower", problem.lower(step))
        update("lower")
        if (step + 1) % self.every == 0:
            logs |= _prefixed("upper", problem.upper(step))
            update("upper")
        return logs


@dataclass(frozen=True)
class Penalty(_EveryK):
    """K inner (lower) steps per outer step."""

    penalty: float  # lambda at step 0
    penalty_end: float  # lambda at the last step (linear schedule); equal to `penalty` for a constant

    label = "bilevel/penalty"
    solver = "penalty"  # the `finetune.solver` it runs (bilevel methods only)

    @classmethod
    def from_config(cls, cfg) -> Penalty:
        solver = cfg.solver
        end = solver.penalty_lambda if solver.penalty_lambda_end < 0 else solver.penalty_lambda_end
        return cls(cfg.max_steps, cfg.upper.every, solver.penalty_lambda, end)

    @property
    def schedule(self) -> dict:
        # A lambda schedule is linear over max_steps: more steps would move it under a resumed run.
        varying = {"max_steps": self.max_steps} if self.penalty_end != self.penalty else {}
        return {"every": self.every, "penalty": self.penalty, "penalty_end": self.penalty_end, **varying}

    def penalty_at(self, step: int) -> float:
        frac = step / max(self.max_steps - 1, 1)
        return self.penalty + frac * (self.penalty_end - self.penalty)

    def __call__(self, step: int, problem: Problem, update: Update) -> dict[str, float]:
        logs = _prefixed("lower", problem.lower(step))
        update("lower")
        if (step + 1) % self.every == 0:
            lam = self.penalty_at(step)
            logs |= _prefixed("upper", problem.upper(step))
            before = problem.lower(step, weight=lam, stream="outer")  # grad L_CU + lambda grad L_ft
            update("upper")
            after = problem.lower_value(step, stream="outer")
            logs |= {"outer/ft": before["ft"], "outer/lambda": lam, "outer/gap": after - before["ft"]}
        return logs


@dataclass(frozen=True)
class TwoStage:
    distill_steps: int  # N: stage 1, the lower level alone
    unlearn_steps: int  # M: stage 2, the upper level alone

    label = "two_stage"
    solver = None  # the `finetune.solver` it runs (bilevel methods only)
    erases_last = True  # its second stage may instead be a whole-model erasure (safeprune.erasure: uce, ...)

    @classmethod
    def from_config(cls, cfg) -> TwoStage:
        # Equal budget by default: as many unlearning steps as bilevel makes upper steps.
        steps = cfg.two_stage.unlearn_steps
        unlearn = steps if steps >= 0 else cfg.max_steps // cfg.upper.every
        check(unlearn > 0, f"two_stage has no unlearning steps (finetune.max_steps={cfg.max_steps} < "
                           f"finetune.upper.every={cfg.upper.every}); raise max_steps or set "
                           "finetune.two_stage.unlearn_steps")
        return cls(cfg.max_steps, unlearn)

    @property
    def total_steps(self) -> int:
        return self.distill_steps + self.unlearn_steps

    @property
    def upper_steps(self) -> int:
        return self.unlearn_steps

    @property
    def schedule(self) -> dict:
        return {"distill_steps": self.distill_steps, "unlearn_steps": self.unlearn_steps}  # the stage boundary

    def upper_index(self, step: int) -> int:
        return max(0, step - self.distill_steps)

    def __call__(self, step: int, problem: Problem, update: Update) -> dict[str, float]:
        if step < self.distill_steps:
            logs = _prefixed("lower", problem.lower(step))
            update("lower")
            return logs
        logs = _prefixed("upper", problem.upper(step))
        update("upper")
        return logs


SOLVERS: dict[str, Callable] = {"alternating": Alternating.from_config, "penalty": Penalty.from_config}


def _bilevel(cfg):
    """`bilevel`: the solver named by `finetune.solver`."""
    return choose("bilevel solver", cfg.solver.name, SOLVERS)(cfg)


METHODS: dict[str, Callable] = {"distill": Distill.from_config, "two_stage": TwoStage.from_config, "bilevel": _bilevel}


def build_method(cfg):
    """The step function for the `finetune` config section (method, solver, K, budgets)."""
    return choose("fine-tuning method", cfg.method, METHODS)(cfg)


def uses_upper(method) -> bool:
    """Whether the method ever takes an upper-level step (needs concepts and concept images)."""
    return method.upper_steps > 0
