"""Two-process data-parallel fine-tuning on CPU (gloo), launched with torchrun (the `accelerate`
command itself needs torchvision here, which this project must not install).

`torchrun --nproc_per_node 2` starts two real DDP ranks; the recipe's Accelerator(cpu=True) joins them over
gloo. The ranks draw different batches (the step seed includes the rank), so equal final weights on both
ranks show that gradients were all-reduced rather than that the ranks happened to agree.

The run is the two-optimiser bilevel step (alternating, an upper step after every 2nd of 6 lower steps):
the summary's `optimizer_states_in_sync` compares a digest of every AdamW moment (exp_avg, exp_avg_sq, step)
of BOTH optimisers across the ranks, so an upper step whose gradients were not all-reduced would show.
"""

import json

import pytest
import torch
from launch_helpers import launch, launcher

from safeprune.models.io import load_unet
from safeprune.pruning import sparsity_masks


@pytest.mark.slow  # a two-process launch (~20 s alone, over a minute on a busy 2-core machine); the in-process
# tests of tests/bilevel/test_distributed.py cover the synchronisation helpers in the fast set
def test_two_cpu_processes_train_one_model(tmp_path, toy_teacher, magnitude_student, fast_flags):
    out = tmp_path / "run"
    cmd = [launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "safeprune.cli", "finetune",
           "--student", str(magnitude_student), "--teacher", str(toy_teacher), "--out", str(out),
           "--method", "bilevel", "--solver", "alternating", "--max-steps", "6", *fast_flags,
           "finetune.upper.every=2"]
    launch(cmd)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_in_sync"] is True
    assert summary["upper_steps"] == 3 and summary["optimizer_states_in_sync"] is True  # lower AND upper AdamW
    assert summary["counts"]["student_bwd"] == 2 * summary["counts_per_process"]["student_bwd"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and sum("upper/cu" in line for line in lines) == 3  # only rank 0 logs
    ckpt = out / "checkpoints" / "step_0000006"
    assert (ckpt / "lower.optim.safetensors").is_file() and (ckpt / "upper.optim.safetensors").is_file()
    tuned, masks = load_unet(out).state_dict(), sparsity_masks(load_unet(magnitude_student))
    assert all(torch.all(tuned[name][~mask] == 0) for name, mask in masks.items())  # masks hold under DDP
