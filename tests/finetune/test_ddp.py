"""Two-process data-parallel fine-tuning on CPU (gloo), launched the way the platform notes say works.

`torchrun --nproc_per_node 2` starts two real DDP ranks; the recipe's Accelerator(cpu=True) joins them over
gloo. The ranks draw different batches (the step seed includes the rank), so equal final weights on both
ranks show that gradients were all-reduced rather than that the ranks happened to agree.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprune.models.io import load_unet
from safeprune.pruning import sparsity_masks


def test_two_cpu_processes_train_one_model(tmp_path, toy_teacher, magnitude_student, fast_flags):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "safeprune.cli", "finetune",
           "--student", str(magnitude_student), "--teacher", str(toy_teacher), "--out", str(out),
           "--max-steps", "4", *fast_flags]
    # A session of its own, so a hang kills the launcher AND both ranks (not just torchrun).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_in_sync"] is True
    assert summary["counts"]["student_bwd"] == 2 * summary["counts_per_process"]["student_bwd"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # only rank 0 logs
    tuned, masks = load_unet(out).state_dict(), sparsity_masks(load_unet(magnitude_student))
    assert all(torch.all(tuned[name][~mask] == 0) for name, mask in masks.items())  # masks hold under DDP
