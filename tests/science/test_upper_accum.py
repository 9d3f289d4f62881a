"""The upper step accumulates gradients like the lower one, so its global batch need not follow the GPU count."""

import contextlib
import copy

import pytest
import torch

from safeprune.bilevel.problem import step_generator
from safeprune.config import load_config
from safeprune.models import toy


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = toy.build_unet().eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return teacher, student


def test_upper_step_accumulates_micro_batches_and_syncs_once(pair, toy_problem):
    teacher, student = pair
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(1)
        yield

    problem = toy_problem(student, teacher, upper_grad_accum=3, no_sync=no_sync)
    student.zero_grad(set_to_none=True)
    cu = problem.upper(5, weight=2.0)["cu"]
    accumulated = [p.grad.clone() for p in student.parameters()]
    assert len(entered) == 2  # DDP all-reduces only on the last of the 3 micro-batches
    assert problem.counts["student_bwd"] == 6 and problem.counts["student_fwd"] == 6

    # reference: the same three consecutive micro-batches of step 5, each weighted 2/3
    reference = toy_problem(student, teacher)
    student.zero_grad(set_to_none=True)
    gen, means = step_generator(0, 0, 5, "upper"), []
    for _ in range(3):
        loss = reference._upper_terms(gen)
        (loss.mean() * 2.0 / 3).backward()
        means.append(loss.mean().item())
    assert cu == pytest.approx(sum(means) / 3, rel=1e-6)
    assert len(set(means)) == 3  # three different batches, not one batch three times
    for got, want in zip(accumulated, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_config_and_dry_run_count_the_accumulated_upper_batch():
    from safeprune.recipes.launch import describe_finetune

    cfg = load_config(overrides=["finetune.upper.grad_accum=4", "finetune.upper.batch_size=16"])
    assert cfg.finetune.upper.grad_accum == 4 and load_config().finetune.upper.grad_accum == 1
    assert "64 concept images per upper step (16 x 1 x 4 accumulation)" in describe_finetune(cfg, None)
