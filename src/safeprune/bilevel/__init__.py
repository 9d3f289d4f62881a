"""Bilevel fine-tuning: the per-iteration methods (solvers.py) and the diffusion problem they solve (problem.py)."""

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
