"""Fixtures of the eval tests: a random-weight toy pipeline folder and the judge (the shipped one)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_pipe_dir(random_teacher_dir):
    """A randomly initialised toy StableDiffusionPipeline folder (the root conftest's)."""
    return random_teacher_dir


@pytest.fixture(scope="session")
def toy_pipe(toy_pipe_dir):
    from safeprune.recipes.generate import load_model

    return load_model(toy_pipe_dir)


@pytest.fixture(scope="session")
def judge():
    from safeprune.eval.judge import load_judge

    return load_judge()
