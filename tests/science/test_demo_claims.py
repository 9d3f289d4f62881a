"""The demo's claims are conditional: "distill leaks" is a finding; bilevel must suppress what leaks (with objects
still drawn) and do no harm where nothing leaks."""

import pytest

from safeprune.recipes.demo import judge_claims, leak_findings, leaks


def _row(leak, fd, forget_valid=1.0, retention=0.9):
    return {"valid": 0.95, "leakage": leak, "forget_valid": forget_valid, "retention": retention, "adherence": 0.9,
            "fd": fd}


def _rows(bilevel, distill=None, **controls):
    return {"teacher": _row(0.9, 5.0), **controls, "distill": distill or _row(0.8, 10.0), "two_stage": _row(0.2, 14.0),
            "bilevel": bilevel}


def test_blank_forget_images_are_not_suppression():
    assert judge_claims(_rows(_row(0.05, 10.5, forget_valid=0.95)))[0]["bilevel_suppresses"]
    # leakage 0 because 30 % of the forget prompts drew no object: not suppression
    checks, notes = judge_claims(_rows(_row(0.0, 10.5, forget_valid=0.7)))
    assert not checks["bilevel_suppresses"] and "bilevel suppresses: NO" in notes
    assert judge_claims(_rows(_row(0.05, 10.5, forget_valid=0.9)))[0]["bilevel_suppresses"]  # the bound is >= 0.9


@pytest.mark.parametrize(("leak", "teacher", "expected"), [
    (0.5, 1.0, True),  # half the teacher's: leaks
    (0.45, 1.0, False),  # under half the teacher's
    (0.19, 0.3, False),  # over half a weak teacher's, but under the floor of 0.2
    (0.2, 0.3, True),
    (0.0, 0.0, False),  # a teacher that never drew the concept: nothing leaks
])
def test_the_leak_rule(leak, teacher, expected):
    assert leaks(_row(leak, 1.0), _row(teacher, 1.0)) is expected


def test_a_distill_that_does_not_leak_is_a_finding_and_bilevel_must_do_no_harm():
    quiet = _row(0.05, 10.0)  # the distilled student never copied the concept
    checks, notes = judge_claims(_rows(_row(0.06, 10.5), distill=quiet))
    assert checks == {"students_recovered": True, "bilevel_does_no_harm": True}  # no suppress / beats checks
    assert any("distill does not leak (0.05)" in n for n in notes)
    assert "bilevel does no harm: yes" in notes
    harms = {
        "re-teaches the concept": _row(0.2, 10.5),  # leakage above distill's + 0.05
        "blank forget images": _row(0.0, 10.5, forget_valid=0.6),  # leakage 0, but objects erased
        "loses retention": _row(0.05, 10.5, retention=0.8),
        "costs quality": _row(0.05, 11.5),  # fd above 1.1x distill's
    }
    for why, bilevel in harms.items():
        checks, notes = judge_claims(_rows(bilevel, distill=quiet))
        assert checks["bilevel_does_no_harm"] is False, why
        assert "bilevel does no harm: NO" in notes


def test_where_distill_leaks_there_is_no_no_harm_check_and_the_controls_are_reported():
    rows = _rows(_row(0.05, 10.5), pruned=_row(0.85, 40.0), denoise_only=_row(0.1, 12.0))
    checks, notes = judge_claims(rows)
    assert "bilevel_does_no_harm" not in checks and checks["bilevel_suppresses"] and checks["bilevel_beats_two_stage"]
    found = leak_findings(rows)
    assert found["pruned"] and not found["denoise_only"] and found["distill"] and not found["bilevel"]
    leak_note = next(n for n in notes if n.startswith("leaks ="))
    assert "pruned leaks (0.85)" in leak_note and "denoise_only does not leak (0.10)" in leak_note
