"""Bilevel fine-tuning: the per-iteration methods (solvers.py), the diffusion problem they solve (problem.py),
its pools (pools.py), the optimisers and update rule of a run (training.py), and what data-parallel and
sharded training change in the two-optimiser step (distributed.py)."""

from safeprune.bilevel.solvers import (
    METHODS,
    SOLVERS,
    Alternating,
    Distill,
    Penalty,
    Problem,
    TwoStage,
    build_method,
    uses_upper,
)

__all__ = ["METHODS", "SOLVERS", "Alternating", "Distill", "Penalty", "Problem", "TwoStage", "build_method",
           "uses_upper"]
