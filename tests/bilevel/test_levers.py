"""The upper-level levers of issue 15 (item 4): where x_t comes from, a preservation term, the upper-lr warm-up."""

import copy

import pytest
import torch

from safeprune.bilevel import build_method
from safeprune.config import FinetuneConfig, UpperConfig, load_config
from safeprune.errors import UserError
from safeprune.models import toy


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return toy.build_unet().eval().requires_grad_(False)


@pytest.fixture
def student():
    torch.manual_seed(1)
    return toy.build_unet()


def test_student_xt_come_from_the_student_not_from_the_concept_images(teacher, student, toy_problem):
    """images=student: the loss no longer depends on the concept pool's latents, it does on the student's own
    sampling run; images=concept (today) is the other way round."""
    def cu(problem, scale):
        problem.pools.concept.mean = problem.pools.concept.mean * scale  # other concept images, same prompts
        return problem.upper(0)["cu"]

    on_policy = [cu(toy_problem(student, teacher, "esd_anchor", upper_images="student"), s) for s in (1.0, 5.0)]
    assert on_policy[0] == pytest.approx(on_policy[1], rel=1e-6)
    noised = [cu(toy_problem(student, teacher, "esd_anchor"), s) for s in (1.0, 5.0)]
    assert noised[0] != pytest.approx(noised[1], rel=1e-3)
    problem = toy_problem(student, teacher, "esd_anchor", upper_images="student", sample_steps=4)
    problem.upper(0)
    assert "student_sample_fwd" in problem.counts  # the sampling passes are counted (and reported)


def test_the_preservation_term_adds_the_retained_prompt_mismatch(teacher, student, toy_problem):
    """cu(w) = L_CU + w * || eps_S(x_t, r) - eps_T(x_t, r) ||^2: linear in w, and nothing for a teacher copy."""
    cu = {w: toy_problem(student, teacher, "esd_anchor", preserve=w).upper(0)["cu"] for w in (0.0, 1.0, 2.0)}
    assert cu[1.0] > cu[0.0]
    assert cu[2.0] - cu[0.0] == pytest.approx(2 * (cu[1.0] - cu[0.0]), rel=1e-4)
    same = copy.deepcopy(teacher).requires_grad_(True)
    plain, kept = (toy_problem(same, teacher, "esd_anchor", preserve=w).upper(0)["cu"] for w in (0.0, 1.0))
    assert kept == pytest.approx(plain, rel=1e-6)  # the teacher already predicts what it predicts


def test_upper_index_counts_the_upper_steps_before_each_iteration():
    cfg = {"max_steps": 8, "upper": UpperConfig(every=4)}
    alternating = build_method(FinetuneConfig(method="bilevel", **cfg))
    assert [alternating.upper_index(s) for s in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]  # upper steps at 3 and 7
    two_stage = build_method(FinetuneConfig(method="two_stage", **cfg))
    assert [two_stage.upper_index(s) for s in range(8, 10)] == [0, 1]


@pytest.mark.parametrize("override, message", [
    ("finetune.upper.images=teacher", "finetune.upper.images='teacher'; choose concept, anchor, student"),
    ("finetune.upper.preserve=-1", "preserve must be >= 0"),
    ("finetune.upper.warmup_steps=-1", "warmup_steps must be >= 0"),
    ("finetune.upper.sample_steps=0", "sample_steps must be >= 1"),
])
def test_bad_lever_settings_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(overrides=[override])
    assert "\n" not in str(err.value)
