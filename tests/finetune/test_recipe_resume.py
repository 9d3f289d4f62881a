"""Exact resume after a kill, and a diverging run that stops with its last good checkpoint kept."""

import json
import shutil

import pytest
import torch

import safeprune.checkpoint
from safeprune.cli import main
from safeprune.models.io import load_unet

# EMA and gradient accumulation on, so their state has to survive the restart too; the checkpoint at step 3
# falls between the upper steps (every 2nd), and the resumed step 4 is an upper step.
RUN = ["--max-steps", "4", "--method", "bilevel", "finetune.ckpt_every_steps=3", "finetune.ema_decay=0.5",
       "finetune.grad_accum=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, toy_teacher, student_dir, fast_flags):
    """The uninterrupted run that a killed-and-resumed one must equal, and that a changed resume is refused on."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["finetune", "--out", str(out), "--student", str(student_dir), "--teacher", str(toy_teacher),
                 *fast_flags, *RUN]) == 0
    return out


def _rows(out):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_and_resumed_run_ends_with_the_same_weights(finetune_cli, straight, tmp_path, monkeypatch):
    real_save = safeprune.checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):  # the process is killed right after the first checkpoint lands
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(safeprune.checkpoint, "save_checkpoint", save_then_die)
    out = tmp_path / "resumed"
    assert finetune_cli(out, *RUN)[0] == 130
    assert not (out / "model").exists() and len(_rows(out)) == 3  # no result yet, 3 steps logged
    monkeypatch.setattr(safeprune.checkpoint, "save_checkpoint", real_save)
    code, err = finetune_cli(out, *RUN, "--resume")
    assert code == 0, err

    want, resumed = load_unet(straight).state_dict(), load_unet(out).state_dict()
    assert all(torch.equal(want[k], resumed[k]) for k in want)
    assert _rows(out) == _rows(straight)  # same losses, same pass counts, no duplicate lines
    # the run is complete: resuming again is refused
    code, err = finetune_cli(out, *RUN, "--resume")
    assert code == 2 and "already complete" in err


def test_resume_refuses_a_changed_configuration(finetune_cli, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)  # a changed key is refused before "already complete" is even considered
    code, err = finetune_cli(out, *RUN, "--max-steps", "6", "--resume", "finetune.lambda_out=1.0")
    assert code == 2 and "finetune.lambda_out was 2.0" in err and len(err.strip().splitlines()) == 1


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(finetune_cli, tmp_path):
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "6", "--method", "distill", "finetune.lr=1e30",
                             "finetune.max_grad_norm=0", "finetune.ckpt_every_steps=1")
    message = err.strip().splitlines()[-1]  # after the training progress bar: one line
    assert code == 2 and message.startswith("safeprune finetune: error: ") and err.count("error:") == 1, err
    # lr 1e30 blows the weights up at the first step: no checkpoint of them is ever written
    assert "weights diverged at step 1" in message and "no checkpoint was written yet" in message, message
    assert not list((out / "checkpoints").glob("step_*"))
    assert not (out / "config.json").exists()  # no result that looks valid
