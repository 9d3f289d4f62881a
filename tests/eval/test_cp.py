"""CP score: a win needs the concept probability to fall by more than a margin; the reference scores 0 against itself."""

from types import SimpleNamespace

import numpy as np
import pytest

from safeprune.data.toyworld import STYLES
from safeprune.errors import UserError
from safeprune.eval.cp import CP_MARGIN, cp_score
from safeprune.eval.toy import CP


def test_noise_below_the_margin_is_not_a_win():
    p_ref = np.array([0.97, 0.99, 0.95, 0.90])
    p_model = np.array([0.95, 0.91, 0.05, 0.30])  # two leak (a little less sure), two are suppressed
    valid = np.ones(4, bool)
    assert cp_score(p_model, p_ref, valid) == 0.5
    assert cp_score(p_model, p_ref, valid, margin=0.0) == 1.0  # the plain comparison counted every image
    assert cp_score(p_model, p_ref, np.array([True, True, False, True])) == 0.25  # no object: never a win
    assert cp_score(p_ref, p_ref, valid, margin=0.0) == 0.0  # the reference itself: 0 by construction
    assert cp_score([0.45], [0.95], [True]) == 0.0 and cp_score([0.44], [0.95], [True]) == 1.0  # strictly more
    assert 0 < CP_MARGIN < 1


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="equal-length"):
        cp_score([0.1, 0.2], [0.3], [True, True])
    with pytest.raises(UserError, match="margin"):
        cp_score([0.1], [0.3], [True], margin=1.5)


def _generated(p_striped, valid):
    probs = np.zeros((len(p_striped), len(STYLES)))
    probs[:, STYLES.index("striped")] = p_striped
    records = [{"shape": "circle", "colour": "red", "style": "striped"}] * len(p_striped)
    return SimpleNamespace(records=records, judged={"probs": {"style": probs}, "valid": np.array(valid)})


def test_the_metric_scores_with_the_margin():
    """A student that still draws the concept, only a little less surely than its reference, has CP 0."""
    mine, ref = _generated([0.93, 0.96, 0.2, 0.9], [True] * 4), _generated([0.99, 0.98, 0.99, 0.95], [True] * 4)
    ctx = SimpleNamespace(reference_pipe=object(), set_names=lambda kind: [kind],
                          generated=lambda name, reference=False: ref if reference else mine,
                          world=SimpleNamespace(forbidden={"style": ("striped",), "shape": (), "colour": ()}))
    assert CP()(ctx) == {"cp": 0.25}


def test_evaluate_names_the_reference_and_a_model_against_itself_scores_zero(random_teacher_dir, tmp_path, capsys):
    import json

    from safeprune.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(random_teacher_dir), "--reference", str(random_teacher_dir), "--out",
                 str(out), "--metrics", "cp", "sample.steps=2", "eval.seeds_per_prompt=1", "eval.max_prompts=2",
                 "eval.heldout=false"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["reference"] == str(random_teacher_dir) and record["cp_margin"] == CP_MARGIN
    assert record["metrics"]["cp"] == 0.0  # the same model and seeds: identical images never win
    assert f"cp: against {random_teacher_dir}" in capsys.readouterr().out
