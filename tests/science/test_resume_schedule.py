"""A resume may add steps, but not move two-stage's stage boundary or a linear lambda schedule of `penalty`."""

import json

import pytest

from safeprune.bilevel import Alternating, Distill, Penalty, TwoStage


def test_schedules_name_what_max_steps_would_move():
    assert TwoStage(4, 2).schedule != TwoStage(6, 2).schedule  # the stage boundary
    assert Penalty(4, 2, 1.0, 5.0).schedule != Penalty(6, 2, 1.0, 5.0).schedule  # lambda's linear span
    assert Penalty(4, 2, 1.0, 1.0).schedule == Penalty(6, 2, 1.0, 1.0).schedule  # a constant lambda: free
    assert Alternating(4, 2).schedule == Alternating(6, 2).schedule and Distill(4).schedule == Distill(6).schedule
    json.dumps(TwoStage(4, 2).schedule)  # stored in the checkpoint's state.json


@pytest.mark.parametrize("method, flags", [
    ("two_stage", []),  # in the unlearning stage at step 6 (4 + 2): 8 steps would go back to distillation
    ("bilevel", ["--solver", "penalty", "finetune.solver.penalty_lambda_end=5.0"]),
])
def test_resume_with_more_steps_refuses_a_moved_schedule(finetune_cli, tmp_path, method, flags):
    out = tmp_path / method
    code, err = finetune_cli(out, "--max-steps", "4", "--method", method, *flags, "finetune.ckpt_every_steps=2")
    assert code == 0, err
    state = json.loads((sorted((out / "checkpoints").iterdir())[-1] / "state.json").read_text())
    assert "schedule" in state
    code, err = finetune_cli(out, "--max-steps", "8", "--method", method, *flags, "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "schedule" in lines[0] and "--max-steps 4" in lines[0], err
    assert not (out / "checkpoints" / "step_0000008").exists()


def test_resume_with_more_steps_still_works_where_the_schedule_stays(finetune_cli, tmp_path):
    out = tmp_path / "penalty"
    flags = ["--method", "bilevel", "--solver", "penalty", "finetune.ckpt_every_steps=2"]  # constant lambda
    assert finetune_cli(out, "--max-steps", "2", *flags)[0] == 0
    code, err = finetune_cli(out, "--max-steps", "4", *flags, "--resume")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
