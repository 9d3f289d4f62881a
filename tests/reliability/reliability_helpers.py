"""Helpers of the fault-injection tests (a uniquely named module: `conftest` names clash across test folders)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Seconds per run on 2 CPU cores; checkpoints every 2 steps, two kept (fallback needs an older one).
FAST = ["finetune.batch_size=2", "finetune.upper.batch_size=2", "finetune.data.pool=12", "finetune.data.concept_pool=6",
        "finetune.warmup_steps=0", "finetune.upper.every=2", "finetune.ckpt_every_steps=2",
        "finetune.keep_checkpoints=2"]
RUN = ["--max-steps", "6", "--method", "bilevel"]
KILL_ENTRY = Path(__file__).with_name("kill_entry.py")


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
