"""The diffusion bilevel problem: batches pure in (seed, rank, step, stream), KD terms, NaN guard."""

import copy

import pytest
import torch

from safeprune.bilevel.problem import NonFiniteLoss, step_generator
from safeprune.models import toy


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return toy.build_unet().eval().requires_grad_(False)


def test_step_generators_depend_only_on_their_key():
    draw = lambda *key: torch.randn(3, generator=step_generator(*key))
    assert torch.equal(draw(0, 0, 5, "lower"), draw(0, 0, 5, "lower"))
    for other in [(1, 0, 5, "lower"), (0, 1, 5, "lower"), (0, 0, 6, "lower"), (0, 0, 5, "outer")]:
        assert not torch.equal(draw(0, 0, 5, "lower"), draw(*other))


def test_a_teacher_copy_has_zero_kd_and_lower_value_replays_the_batch(teacher, toy_problem):
    student = copy.deepcopy(teacher).requires_grad_(True)
    problem = toy_problem(student, teacher)
    logs = problem.lower(3, stream="outer")
    assert logs["out_kd"] == 0 and logs["feat_kd"] == 0 and logs["ft"] == pytest.approx(logs["diff"])
    assert all(p.grad is not None for p in student.parameters())
    assert problem.lower_value(3, stream="outer") == pytest.approx(logs["ft"], rel=1e-6)
    assert problem.lower_value(4, stream="outer") != pytest.approx(logs["ft"], rel=1e-6)
    assert problem.counts == {"student_fwd": 6, "student_bwd": 2, "teacher_fwd": 6}


@pytest.mark.parametrize("unlearn", ["esd", "ablation"])
def test_upper_step_is_zero_only_where_there_is_nothing_to_erase(teacher, toy_problem, unlearn):
    student = copy.deepcopy(teacher).requires_grad_(True)
    problem = toy_problem(student, teacher, unlearn)
    cu = problem.upper(0)["cu"]
    assert cu > 0 and problem.counts["teacher_fwd"] == 2 * len(problem.unlearning.teacher_conditions)
    # with target = anchor = null prompt, the teacher-equal student already predicts the target
    problem.pools.concept_target = problem.pools.concept_anchor = torch.zeros(8, dtype=torch.long)
    assert problem.upper(0)["cu"] == pytest.approx(0.0, abs=1e-10)


def test_gradient_accumulation_averages_the_micro_batches(teacher, toy_problem):
    student = toy.build_unet()
    problem = toy_problem(student, teacher)
    problem.grad_accum = 2
    logs = problem.lower(0)
    accumulated = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    gen = step_generator(0, 0, 0, "lower")  # the same two micro-batches, by hand
    first, second = problem._lower_terms(gen, True)["ft"], problem._lower_terms(gen, True)["ft"]
    ((first.mean() + second.mean()) / 2).backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7) for a, p in zip(accumulated, student.parameters()))
    assert logs["ft"] == pytest.approx((first.mean().item() + second.mean().item()) / 2, rel=1e-5)
    assert problem.counts["student_bwd"] == 4


def test_non_finite_loss_is_caught_before_backward(teacher, toy_problem):
    student = toy.build_unet()
    with torch.no_grad():
        student.conv_out.bias.fill_(float("nan"))
    problem = toy_problem(student, teacher)
    with pytest.raises(NonFiniteLoss, match="lower loss is not finite at step 8"):
        problem.lower(7)
    assert all(p.grad is None for p in student.parameters())  # nothing was back-propagated


def test_gradient_checkpointing_gives_the_same_gradients(teacher, toy_problem):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        student = toy.build_unet().train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        toy_problem(student, teacher).lower(0)
        grads.append([p.grad for p in student.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))
