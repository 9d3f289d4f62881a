"""The demo's "bilevel suppresses" check: low leakage counts only while the forget prompts still show objects."""

from safeprune.recipes.demo import judge_claims


def _row(leak, fd, forget_valid=1.0):
    return {"valid": 0.95, "leakage": leak, "forget_valid": forget_valid, "retention": 0.9, "adherence": 0.9, "fd": fd}


def _rows(bilevel):
    return {"teacher": _row(0.9, 5.0), "distill": _row(0.8, 10.0), "two_stage": _row(0.2, 14.0), "bilevel": bilevel}


def test_blank_forget_images_are_not_suppression():
    assert judge_claims(_rows(_row(0.05, 10.5, forget_valid=0.95)))[0]["bilevel_suppresses"]
    # leakage 0 because 30 % of the forget prompts drew no object: not suppression
    checks, notes = judge_claims(_rows(_row(0.0, 10.5, forget_valid=0.7)))
    assert not checks["bilevel_suppresses"] and "bilevel suppresses: NO" in notes
    assert judge_claims(_rows(_row(0.05, 10.5, forget_valid=0.9)))[0]["bilevel_suppresses"]  # the bound is >= 0.9
