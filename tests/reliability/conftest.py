"""Fault-injection fixtures: a random toy teacher, a student pruned from it by `safeprune prune` (so it carries
lineage), a second teacher, and a runner for in-process `safeprune` calls that returns (exit code, stderr)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprune.cli import main

# Seconds per run on 2 CPU cores; checkpoints every 2 steps, two kept (fallback needs an older one).
FAST = ["finetune.batch_size=2", "finetune.upper.batch_size=2", "finetune.data.pool=12", "finetune.data.concept_pool=6",
        "finetune.warmup_steps=0", "finetune.upper.every=2", "finetune.ckpt_every_steps=2",
        "finetune.keep_checkpoints=2"]
RUN = ["--max-steps", "6", "--method", "bilevel"]
KILL_ENTRY = Path(__file__).with_name("kill_entry.py")


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stderr) of an in-process `safeprune` call."""

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def teacher(random_teacher_dir):
    return random_teacher_dir


@pytest.fixture(scope="session")
def other_teacher(tmp_path_factory):
    """Another random toy pipeline: same architecture, other weights."""
    from safeprune.data.toyworld import ToyWorld
    from safeprune.models import toy

    root = tmp_path_factory.mktemp("other_teacher")
    toy.build_pipeline(root / "tok", ToyWorld().vocabulary(), seed=1).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def student(teacher, tmp_path_factory):
    """`safeprune prune --model TEACHER --method channels --ratio 0.3` (records the teacher's fingerprint)."""
    out = tmp_path_factory.mktemp("student") / "channels"
    assert main(["prune", "--model", str(teacher), "--method", "channels", "--ratio", "0.3", "--out", str(out),
                 "prune.latency_runs=1", "prune.latency_batch=1"]) == 0
    assert json.loads((out / "lineage.json").read_text())["teacher_fingerprint"]
    return out


@pytest.fixture(scope="session")
def unmatched_student(tmp_path_factory):
    """A UNet that takes the teacher's inputs but whose every block has another width: no feature pairs."""
    from safeprune.models import toy
    from safeprune.models.io import save_unet

    torch.manual_seed(0)
    return save_unet(toy.build_unet(block_out_channels=(16, 48, 48)), tmp_path_factory.mktemp("unmatched") / "u", None)


@pytest.fixture
def finetune(cli, teacher, student):
    """finetune(out, *flags) -> (exit code, stderr): the fast bilevel run with this teacher and student."""

    def run(out, *extra):
        argv = ["finetune", "--out", out, *FAST, *RUN, *extra]
        argv += [] if "--student" in extra else ["--student", student]
        argv += [] if "--teacher" in extra else ["--teacher", teacher]
        return cli(*argv)

    return run


@pytest.fixture(scope="session")
def straight(teacher, student, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["finetune", "--out", str(out), *FAST, *RUN, "--student", str(student), "--teacher", str(teacher)]) == 0
    return out


def weights(folder):
    from safetensors.torch import load_file

    # a run folder's model/ is a pipeline (its UNet in unet/); a bare UNet folder holds the file itself
    path = next(p for p in (folder / "model" / "unet", folder / "unet", folder)
                if (p / "diffusion_pytorch_model.safetensors").is_file())
    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metric_rows(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def spawn(argv, kill_on: str = "", **kwargs) -> subprocess.Popen:
    """`safeprune ARGV` in a child process; kill_on='module:attr:needle:nth[:after]' makes the child SIGKILL
    itself on the nth call of module.attr whose arguments mention `needle` (before the call, or after it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "KILL_ON": kill_on, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(KILL_ENTRY), *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)
