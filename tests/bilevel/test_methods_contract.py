"""The contract every registered fine-tuning method (and bilevel solver) keeps, over `METHODS` x `SOLVERS`:
built from the config section by its registry entry, pure in `step` (a resumed run replays the schedule),
and honest about its budget (the upper steps it reports are the upper steps it takes)."""

import dataclasses

import pytest
from test_solvers import Quadratic, solve

from safeprune.bilevel import METHODS, SOLVERS, build_method, uses_upper
from safeprune.config import FinetuneConfig, SolverConfig, UpperConfig


def _method(name, solver):
    cfg = FinetuneConfig(method=name, max_steps=40, upper=UpperConfig(every=5),
                         **({"solver": SolverConfig(solver)} if solver else {}))
    return build_method(cfg)


# A method that runs a `finetune.solver` (its built object names one) is checked with every solver.
CASES = [(m, s) for m in sorted(METHODS) for s in (sorted(SOLVERS) if _method(m, None).solver else [None])]


@pytest.mark.parametrize(("name", "solver"), CASES)
def test_reported_budget_is_what_runs(name, solver):
    method = _method(name, solver)
    problem, logs = solve(method)
    assert len(logs) == method.total_steps
    assert problem.calls["upper"] == method.upper_steps and uses_upper(method) == (method.upper_steps > 0)
    assert sum(any(k.startswith("upper/") for k in log) for log in logs) == method.upper_steps


@pytest.mark.parametrize(("name", "solver"), CASES)
def test_frozen_labelled_and_pure_in_step(name, solver):
    method = _method(name, solver)
    assert dataclasses.is_dataclass(method) and method.solver == solver
    assert method.label.split("/")[0] == name
    calls = lambda steps: [sorted(method(s, Quadratic(), lambda which: None)) for s in steps]
    assert calls([7, 3, 7]) == [calls([7])[0], calls([3])[0], calls([7])[0]]  # no state carried between steps
