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


@pytest.fixture(scope="session")
def toy_problem():
    """Factory of a bilevel DiffusionProblem on toy UNets over fixed random pools (8 latents, 5 prompt embeddings:
    concept target 3, anchor 4, null 0): `toy_problem(student, teacher, unlearn="esd", **problem_fields)`."""
    from safeprune.bilevel.problem import DiffusionProblem, Pools
    from safeprune.data.datasets import LatentPool
    from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss
    from safeprune.models import toy
    from safeprune.models.hooks import match_blocks
    from safeprune.unlearning import build_unlearning

    def make(student, teacher, unlearn="esd", **kwargs):
        g = torch.Generator().manual_seed(0)
        pool = LatentPool(torch.randn(8, 4, 16, 16, generator=g), 0.1 * torch.rand(8, 4, 16, 16, generator=g),
                          ["c"] * 8, [{}] * 8)
        pools = Pools(lower=pool, lower_prompt=torch.arange(8) % 3, embeddings=torch.randn(5, 6, 64, generator=g),
                      null_prompt=0, concept=pool, concept_target=torch.full((8,), 3),
                      concept_anchor=torch.full((8,), 4))
        sched = toy.build_schedulers()[0]
        loss = LowerLevelLoss(DenoisingLoss(sched), FeatureKD(tuple(match_blocks(teacher, student))))
        return DiffusionProblem(**{"student": student, "student_core": student, "teacher": teacher, "scheduler": sched,
                                   "lower_loss": loss, "pools": pools, "unlearning": build_unlearning(unlearn),
                                   "batch_size": 2, "upper_batch_size": 2, "seed": 0, **kwargs})

    return make
