"""Fixtures of the eval tests: a random-weight toy pipeline folder and the judge (the shipped one)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_pipe_dir(tmp_path_factory):
    """A randomly initialised toy StableDiffusionPipeline saved with save_pretrained (no download, ~1 s)."""
    from safeprune.data.toyworld import ToyWorld
    from safeprune.models import toy

    root = tmp_path_factory.mktemp("toy_pipe")
    pipe = toy.build_pipeline(root / "tokenizer_src", ToyWorld().vocabulary(), seed=0)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def toy_pipe(toy_pipe_dir):
    from safeprune.recipes.generate import load_model

    return load_model(toy_pipe_dir)


@pytest.fixture(scope="session")
def judge():
    from safeprune.eval.judge import load_judge

    return load_judge()
