"""Faults short of kill -9 (tests/reliability/test_kill.py has those): corrupt and edited checkpoints, diverging
runs, folders stuck between states, two writers, full and read-only disks, lineage, and users' own files."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from reliability_helpers import metric_rows, same_weights, weights

import safeprune.checkpoint
from safeprune.checkpoint import CorruptCheckpoint, save_checkpoint, verify
from safeprune.runs import MARKER


def _interrupt_after(monkeypatch, n: int, before: bool = False):
    """The nth checkpoint of the next run raises KeyboardInterrupt (a Ctrl-C), after it is written or before."""
    real, calls = safeprune.checkpoint.save_step, [0]

    def save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and before:
            raise KeyboardInterrupt
        folder = real(*args, **kwargs)
        if calls[0] == n:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(safeprune.checkpoint, "save_step", save)
    return lambda: monkeypatch.setattr(safeprune.checkpoint, "save_step", real)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error:" in line or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- checkpoints


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(finetune, straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    restore = _interrupt_after(monkeypatch, 2)  # checkpoints at steps 2 and 4, then Ctrl-C
    assert finetune(out)[0] == 130
    restore()
    latest = out / "checkpoints" / "step_0000004" / "student.safetensors"
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the last tensor: safetensors still parses it
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_0000004': student.safetensors is missing or corrupt.*fell back"):
        code, err = finetune(out, "--resume")
    assert code == 0, err
    assert (out / "checkpoints" / ".corrupt-step_0000004").is_dir()  # set aside, not deleted
    assert same_weights(out, straight) and metric_rows(out) == metric_rows(straight)


def test_a_hand_edited_step_fails_the_content_hash(tmp_path):
    module = torch.nn.Linear(2, 2)
    folder = save_checkpoint(tmp_path / "step_0000003", 3, {"m": module}, extra={"counts": {}})
    assert verify(folder)["step"] == 3
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "step": 5}))
    with pytest.raises(CorruptCheckpoint, match="was edited"):
        verify(folder)


# ----------------------------------------------------------------------------- divergence and stuck folders


def test_an_exploding_run_names_a_checkpoint_that_resumes(finetune, tmp_path):
    out = tmp_path / "run"
    code, err = finetune(out, "finetune.upper.lr=1e6", "finetune.ckpt_every_steps=1")
    line = _one_error_line(err)
    # the first upper step (step 2) multiplies the weights by ~1e5: refused before it is checkpointed
    assert code == 2 and "weights diverged at step 2" in line and "step_0000001" in line, line
    assert not (out / "model").exists()
    code, err = finetune(out, "--resume", "finetune.upper.lr=1e-3", "finetune.ckpt_every_steps=1")
    assert code == 0, err
    assert max(t.abs().max().item() for t in weights(out).values()) < 10  # a sane model, not the exploded one


def test_a_run_stopped_before_its_first_checkpoint_resumes_or_restarts(finetune, tmp_path):
    out = tmp_path / "run"
    flags = ["--method", "distill", "--max-steps", "2", "finetune.max_grad_norm=0"]
    code, err = finetune(out, *flags, "finetune.lr=1e30")
    assert code == 2 and "no checkpoint was written yet" in _one_error_line(err)
    code, err = finetune(out, *flags)  # neither flag: says which two exist
    assert code == 2 and "--resume" in err and "--overwrite" in err and "training" in err, err
    code, err = finetune(out, *flags, "--resume")  # from step 0, with a sane lr
    assert code == 0, err
    (out / "notes.txt").write_text("mine")  # a user's file in a finished run folder
    code, err = finetune(out, *flags, "--overwrite")
    assert code == 2 and "notes.txt" in _one_error_line(err)
    (out / "notes.txt").unlink()
    assert finetune(out, *flags, "--overwrite")[0] == 0
    assert json.loads((out / MARKER).read_text())["state"] == "finished"


def test_more_steps_interrupted_leaves_no_stale_result(finetune, tmp_path, monkeypatch):
    out, ref = tmp_path / "run", tmp_path / "ref"
    assert finetune(ref, "--method", "distill", "--max-steps", "4")[0] == 0
    assert finetune(out, "--method", "distill", "--max-steps", "2")[0] == 0
    restore = _interrupt_after(monkeypatch, 1, before=True)  # stopped at step 4, before its checkpoint
    assert finetune(out, "--method", "distill", "--max-steps", "4", "--resume")[0] == 130
    restore()
    # config.yaml says 4 steps: the 2-step result must be gone, not left looking finished
    assert "max_steps: 4" in (out / "config.yaml").read_text()
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert json.loads((out / MARKER).read_text())["state"] == "training"
    assert finetune(out, "--method", "distill", "--max-steps", "4", "--resume")[0] == 0
    assert same_weights(out, ref)


# ----------------------------------------------------------------------------- two writers


HOLD = ("import sys, time\nfrom safeprune.runs import lock\nwith lock(sys.argv[1], 'finetune'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


def test_a_second_writer_gets_one_line_naming_the_holder(cli, tmp_path, teacher, student):
    out = tmp_path / "out"
    runs = tmp_path / "r1"
    runs.mkdir()
    (runs / "results.json").write_text(json.dumps({"metrics": {"leakage": 0.5}}))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        commands = [
            ["finetune", "--student", student, "--teacher", teacher, "--out", out, "--max-steps", "1"],
            ["demo", "--out", out], ["prune", "--out", out], ["pretrain", "teacher", "--out", out],
            ["pretrain", "judge", "--out", out], ["toyworld", "preview", "--out", out],
            ["toyworld", "export", out, "--n", "2"], ["generate", "--prompts", "toy:forget", "--out", out],
            ["evaluate", "--out", out, "--metrics", "valid"], ["report", runs, "--out", out],
            ["concept-images", "--prompts", "a red circle", "--out", out]]
        for argv in commands:
            code, err = cli(*argv)
            line = _one_error_line(err)
            assert code == 2 and f"pid {holder.pid}" in line and "in use by" in line, (argv, err)
            assert not out.exists(), argv
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder was killed: its lock is stale and the next writer takes over (with a warning)
    with pytest.warns(UserWarning, match=rf"stale lock .*\(pid {holder.pid} is gone"):
        code, err = cli("toyworld", "preview", "--out", out)
    assert code == 0 and (out / "preview.png").is_file()
    assert not (tmp_path / ".out.lock").exists()  # released on exit


# ----------------------------------------------------------------------------- full and read-only disks


def test_a_full_disk_is_one_line_and_the_run_resumes(finetune, straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = safeprune.checkpoint.save_file, [0]

    def full(tensors, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safeprune.checkpoint, "save_file", full)
    code, err = finetune(out)
    line = _one_error_line(err)
    assert code == 2 and "No space left on device" in line and "free disk space" in line, line
    assert not (out / "model").exists()
    monkeypatch.setattr(safeprune.checkpoint, "save_file", real)
    assert finetune(out, "--resume")[0] == 0
    assert same_weights(out, straight)


def test_a_read_only_output_is_one_line(cli, tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    for argv in (["toyworld", "preview", "--out", tmp_path / "p"], ["toyworld", "export", tmp_path / "e", "--n", "2"]):
        code, err = cli(*argv)
        assert code == 2 and "Read-only file system" in _one_error_line(err), err
        assert not argv[-1 if argv[1] == "preview" else 2].exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_one_line(cli, tmp_path):
    tmp_path.chmod(0o555)
    try:
        code, err = cli("toyworld", "preview", "--out", tmp_path / "p")
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and "Permission denied" in _one_error_line(err)


# ----------------------------------------------------------------------------- lineage and resume inputs


def test_a_student_of_another_teacher_is_refused_unless_allowed(finetune, other_teacher, unmatched_student, tmp_path):
    code, err = finetune(tmp_path / "a", "--teacher", other_teacher)
    assert code == 2 and "pruned from another teacher" in _one_error_line(err) and not (tmp_path / "a").exists()
    code, err = finetune(tmp_path / "b", "--teacher", other_teacher, "--allow-other-teacher", "--max-steps", "1")
    assert code == 0, err
    code, err = finetune(tmp_path / "c", "--student", unmatched_student)
    assert code == 2 and "no block of the student matches" in _one_error_line(err) and not (tmp_path / "c").exists()


def test_resume_checks_the_inputs(finetune, cli, other_teacher, unmatched_student, tmp_path, monkeypatch):
    data = tmp_path / "data"
    assert cli("toyworld", "export", data, "--n", "12")[0] == 0
    out = tmp_path / "run"
    restore = _interrupt_after(monkeypatch, 1)
    assert finetune(out, "--method", "distill")[0] == 130
    restore()
    for flags, said in ((["--data", data], "paths.data was ''"), (["--student", unmatched_student], "paths.student was"),
                        (["--teacher", other_teacher], "model.teacher was")):
        code, err = finetune(out, "--method", "distill", "--resume", *flags)
        assert code == 2 and said in _one_error_line(err), err
    assert finetune(out, "--method", "distill", "--resume")[0] == 0


# ----------------------------------------------------------------------------- users' files


def test_preview_pretrain_and_demo_never_touch_a_users_files(cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "preview.png").write_bytes(b"my picture")
    for argv in (["toyworld", "preview", "--out", mine], ["pretrain", "teacher", "--out", mine],
                 ["pretrain", "teacher", "--out", mine, "--resume"], ["demo", "--out", mine]):
        code, err = cli(*argv)
        assert code == 2 and "already exists" in _one_error_line(err) or "no run" in err, (argv, err)
    assert (mine / "config.yaml").read_text() == "my own config\n" and (mine / "preview.png").read_bytes() == b"my picture"

    preview = tmp_path / "preview"
    assert cli("toyworld", "preview", "--out", preview)[0] == 0
    assert cli("toyworld", "preview", "--out", preview, "toyworld.size=16")[0] == 0  # its own files: replaced
    (preview / "notes.txt").write_text("mine")
    code, err = cli("toyworld", "preview", "--out", preview)
    assert code == 2 and "notes.txt" in _one_error_line(err) and (preview / "notes.txt").read_text() == "mine"

    old_demo = tmp_path / "demo"  # an older demo's folder, marked the old way, with a file the user added
    old_demo.mkdir()
    for name in (".safeprune-demo", "report.md", "notes.txt"):
        (old_demo / name).write_text("x")
    code, err = cli("demo", "--out", old_demo)
    assert code == 2 and "notes.txt" in _one_error_line(err) and (old_demo / "report.md").is_file()
