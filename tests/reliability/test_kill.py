"""kill -9 at chosen and at random moments, then `--resume`: the run ends bit-exact with one never killed,
no temporary leftovers survive, and no killed folder ever looks like a finished model."""

import json
import random
import signal
import sys
import time

import pytest
from reliability_helpers import FAST, RUN, metric_rows, same_weights, spawn

from safeprune.runs import MARKER


def _argv(out, teacher, student, *extra):
    return ["finetune", "--out", out, *FAST, *RUN, "--student", student, "--teacher", teacher, *extra]


def _state(out):
    return json.loads((out / MARKER).read_text())["state"]


def _leftovers(out):
    return [p.name for p in (*out.iterdir(), *(out / "checkpoints").iterdir()) if ".tmp-" in p.name
            or p.name.startswith((".step_", ".result."))]


def test_kills_during_a_checkpoint_write_and_the_final_save_resume_bit_exact(straight, teacher, student, tmp_path,
                                                                            cli):
    out = tmp_path / "run"
    # 1. killed half-way through writing the first checkpoint (its weights written, its optimiser states not)
    child = spawn(_argv(out, teacher, student), kill_on="safeprune.checkpoint:save_file:optim:1")
    assert child.wait(timeout=300) == -signal.SIGKILL, child.stderr.read()
    assert _leftovers(out) and not list((out / "checkpoints").glob("step_*"))  # a torn temporary, no checkpoint
    assert not (out / "model").exists() and _state(out) == "training"
    # 2. resumed (from step 0: nothing was checkpointed), killed during the final save: the model folder is
    #    written, not yet renamed into place
    child = spawn(_argv(out, teacher, student, "--resume"), kill_on="os:replace:.model.tmp-:1")
    assert child.wait(timeout=300) == -signal.SIGKILL, child.stderr.read()
    assert not (out / "model").exists() and list(out.glob(".model.tmp-*"))
    assert _state(out) == "training"  # not finished: no model that loads
    # 3. resumed again (in-process): the final save is redone
    code, err = cli(*_argv(out, teacher, student, "--resume"))
    assert code == 0, err
    assert _state(out) == "finished" and not _leftovers(out)
    assert same_weights(out, straight) and metric_rows(out) == metric_rows(straight)


@pytest.mark.slow
def test_kills_at_random_moments_resume_bit_exact(straight, teacher, student, tmp_path, cli):
    rng, out, killed = random.Random(16), tmp_path / "run", 0
    for attempt in range(3):
        child = spawn(_argv(out, teacher, student, *(["--resume"] if attempt else [])))
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        child.send_signal(signal.SIGKILL)
        killed += child.wait(timeout=60) == -signal.SIGKILL
        if (out / "model").exists():  # finished before the signal: nothing left to kill
            break
    print(f"random kills: {killed} of {attempt + 1} children killed mid-run", file=sys.__stdout__)
    assert killed >= 1
    code, err = cli(*_argv(out, teacher, student, "--resume"))
    assert code == 0 or "already complete" in err, err
    assert _state(out) == "finished" and not _leftovers(out)
    assert same_weights(out, straight) and metric_rows(out) == metric_rows(straight)
