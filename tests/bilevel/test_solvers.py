"""The methods' step functions on a 2-D bilevel problem with a known solution.

Lower level L_ft(theta) = (theta_0 - 1)^2: its solution SET is the line theta_0 = 1 (theta_1 is free, as
a pruned UNet's many near-optimal weights). Upper level L_CU(theta) = theta_0^2 + (theta_1 - 3)^2.
Bilevel solution: theta* = (1, 3). Two-stage ends at argmin L_CU = (0, 3), off the lower level's solution
set: the collateral damage the paper's method avoids.
"""

import pytest
import torch

from safeprune.bilevel import Alternating, Distill, Penalty, TwoStage, build_method
from safeprune.config import FinetuneConfig, SolverConfig, TwoStageConfig, UpperConfig
from safeprune.errors import UserError


class Quadratic:
    def __init__(self):
        self.theta = torch.nn.Parameter(torch.zeros(2))
        self.calls = {"lower": 0, "upper": 0}

    def _ft(self):
        return (self.theta[0] - 1) ** 2

    def lower(self, step, weight=1.0, stream="lower"):
        self.calls["lower"] += 1
        ft = self._ft()
        (weight * ft).backward()
        return {"ft": ft.item()}

    def upper(self, step, weight=1.0):
        self.calls["upper"] += 1
        cu = self.theta[0] ** 2 + (self.theta[1] - 3) ** 2
        (weight * cu).backward()
        return {"cu": cu.item()}

    def lower_value(self, step, stream="lower"):
        return self._ft().item()


def solve(method, lower_lr=0.1, upper_lr=0.1):
    problem = Quadratic()
    opts = {"lower": torch.optim.SGD([problem.theta], lr=lower_lr), "upper": torch.optim.SGD([problem.theta], lr=upper_lr)}

    def update(which):
        opts[which].step()
        problem.theta.grad = None

    logs = [method(step, problem, update) for step in range(method.total_steps)]
    return problem, logs


def test_distill_reaches_the_lower_level_solution_set_only():
    problem, _ = solve(Distill(200))
    assert torch.allclose(problem.theta.detach(), torch.tensor([1.0, 0.0]), atol=1e-4)
    assert problem.calls == {"lower": 200, "upper": 0}


def test_alternating_reaches_the_bilevel_solution():
    problem, logs = solve(Alternating(max_steps=1009, every=10))
    assert torch.allclose(problem.theta.detach(), torch.tensor([1.0, 3.0]), atol=0.05)
    assert problem.calls == {"lower": 1009, "upper": 100}  # one upper step after every 10th lower step
    assert "upper/cu" in logs[9] and "upper/cu" not in logs[10]


def test_penalty_reaches_the_bilevel_solution_and_logs_the_constraint_gap():
    problem, logs = solve(Penalty(max_steps=1009, every=10, penalty=10.0, penalty_end=10.0), upper_lr=0.05)
    assert torch.allclose(problem.theta.detach(), torch.tensor([1.0, 3.0]), atol=0.05)
    gaps = [log["outer/gap"] for log in logs if "outer/gap" in log]
    assert len(gaps) == 100 and all(g > 0 for g in gaps[1:]) and logs[9]["outer/lambda"] == 10.0
    # (the first outer step still descends L_ft: theta_0 had not reached 1 yet.) At the solution the outer
    # step leaves the solution set by lr * grad L_CU = 0.1 in theta_0: a gap of about 0.1^2.
    assert gaps[-1] == pytest.approx(0.01, abs=2e-3)


def test_penalty_lambda_schedule_is_linear_in_step():
    method = Penalty(max_steps=11, every=2, penalty=1.0, penalty_end=11.0)
    assert [method.penalty_at(s) for s in (0, 5, 10)] == [1.0, 6.0, 11.0]


def test_two_stage_ends_at_the_upper_optimum_off_the_solution_set():
    problem, logs = solve(TwoStage(distill_steps=200, unlearn_steps=200))
    assert torch.allclose(problem.theta.detach(), torch.tensor([0.0, 3.0]), atol=1e-3)
    assert abs(logs[199]["lower/ft"]) < 1e-6 and problem.lower_value(0) > 0.99  # quality lost in stage 2


def test_build_method_budgets():
    cfg = {"max_steps": 100, "upper": UpperConfig(every=10)}
    alternating = build_method(FinetuneConfig(method="bilevel", solver=SolverConfig("alternating"), **cfg))
    penalty = build_method(FinetuneConfig(method="bilevel", solver=SolverConfig("penalty", penalty_lambda=2.0), **cfg))
    two_stage = build_method(FinetuneConfig(method="two_stage", **cfg))
    assert alternating.upper_steps == penalty.upper_steps == two_stage.unlearn_steps == 10  # equal budgets
    assert two_stage.total_steps == 110 and penalty.penalty_end == 2.0
    assert build_method(FinetuneConfig(method="two_stage", two_stage=TwoStageConfig(unlearn_steps=7), **cfg)).unlearn_steps == 7
    assert build_method(FinetuneConfig(method="distill", **cfg)).upper_steps == 0
    with pytest.raises(UserError, match="unknown bilevel solver 'newton'"):
        build_method(FinetuneConfig(solver=SolverConfig("newton")))
    with pytest.raises(UserError, match="unknown fine-tuning method"):
        build_method(FinetuneConfig(method="magic"))
    with pytest.raises(UserError, match="no unlearning steps"):
        build_method(FinetuneConfig(method="two_stage", max_steps=5, upper=UpperConfig(every=10)))
