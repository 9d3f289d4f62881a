"""The contract every registered unlearning loss keeps (parametrised over `UNLEARNING`): a per-sample (B,)
loss that is zero when the student predicts the target, never back-propagates into the (teacher-built)
target, and names teacher conditions and a parameter set the upper step knows."""

import pytest
import torch

from safeprune.unlearning import PARAMETER_SETS, UNLEARNING, build_unlearning

NAMES = sorted(UNLEARNING)
CONDITIONS = ("target", "anchor", "null")  # the prompts the upper step can run the teacher with


def _teacher_eps(loss, batch=3):
    gen = torch.Generator().manual_seed(0)
    return {c: torch.randn(batch, 4, 8, 8, generator=gen).requires_grad_(True) for c in loss.teacher_conditions}


@pytest.mark.parametrize("name", NAMES)
def test_zero_at_its_target_with_one_value_per_sample(name):
    loss = build_unlearning(name)
    target = loss.target(_teacher_eps(loss))
    assert target.shape == (3, 4, 8, 8)
    at_target = loss(target.detach().clone(), target)
    assert at_target.shape == (3,) and torch.all(at_target == 0)
    away = loss(target.detach() + 1.0, target)
    assert away.shape == (3,) and torch.all(away > 0)


@pytest.mark.parametrize("name", NAMES)
def test_the_target_is_detached(name):
    loss = build_unlearning(name)
    teacher = _teacher_eps(loss)
    student = torch.randn(3, 4, 8, 8, requires_grad=True)
    loss(student, loss.target(teacher)).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher.values()), "the gradient reached the teacher's predictions"


@pytest.mark.parametrize("name", NAMES)
def test_conditions_and_parameter_set_are_known(name):
    loss = build_unlearning(name)
    assert loss.teacher_conditions and set(loss.teacher_conditions) <= set(CONDITIONS)
    assert loss.params in PARAMETER_SETS
