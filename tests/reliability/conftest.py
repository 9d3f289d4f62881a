"""Fault-injection fixtures: a random toy teacher, a student pruned from it by `safeprune prune` (so it carries
lineage), a second teacher, and a runner for in-process `safeprune` calls that returns (exit code, stderr)."""

import json

import pytest
import torch
from reliability_helpers import FAST, RUN

from safeprune.cli import main


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
