"""Shared test setup: offline, one thread (CI machines have 2 cores), deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def random_teacher_dir(tmp_path_factory):
    """A random-weight toy StableDiffusionPipeline folder (the shipped architecture), built once per session."""
    from safeprune.data.toyworld import ToyWorld
    from safeprune.models import toy

    root = tmp_path_factory.mktemp("random_teacher")
    toy.build_pipeline(root / "tokenizer-src", ToyWorld().vocabulary(), seed=0).save_pretrained(root / "pipe")
    return root / "pipe"
