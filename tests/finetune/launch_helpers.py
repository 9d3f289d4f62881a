"""Launching multi-process CPU runs from tests: the environment and a launcher that cannot hang the suite."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
REPO = Path(__file__).resolve().parents[2]


def launcher(name: str) -> str:
    """`torchrun` or `accelerate` beside this Python (the test is skipped without it)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed beside this Python")
    return path


def launch(cmd: list[str], timeout: float = 180) -> None:
    """Run a launcher command; fail the test with the end of its stderr unless it exits 0."""
    # A session of its own, so a hang kills the launcher AND its ranks (not just the launcher).
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
