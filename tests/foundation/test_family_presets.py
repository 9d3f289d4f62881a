"""The SDXL / SD3 / Flux presets: the recipe resolves, the dry run plans the preset's depth pruning on the meta
device and prints a memory estimate per GPU for the family's denoiser (nothing downloads)."""

import re

import pytest

from safeprune.cli import main
from safeprune.config import load_config

# preset -> (teacher hub id, student size in M parameters as the estimate prints it, text tokens)
PRESETS = {"sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 1316, 77),
           "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", 1009, 333),
           "flux": ("black-forest-labs/FLUX.1-dev", 8163, 512)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_family_preset_dry_run_prints_recipe_and_memory(name, capsys):
    teacher, student_m, tokens = PRESETS[name]
    cfg = load_config(name)
    assert cfg.model.teacher == teacher and cfg.prune.method == "depth" and cfg.finetune.resolution == 1024
    assert cfg.finetune.batch_size * 4 * cfg.finetune.grad_accum == 64  # the paper's global batch on 4 GPUs
    assert main(["finetune", "--config", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"teacher: {teacher}" in out and "max_steps: 20000" in out and "preset:" in out  # the recipe
    line = next(line for line in out.splitlines() if line.startswith("estimated peak memory per GPU"))
    peak = float(re.search(r"per GPU: ([\d.]+) GiB", line).group(1))
    assert f"(student {student_m} M)" in line and f"{tokens} text tokens" in out
    # the student is the preset's pruned architecture, smaller than the teacher, and costs at least its
    # fp32 weights + gradients + AdamW states (16 bytes per parameter)
    assert "prune section planned on meta" in out and peak > 16 * student_m * 1e6 / 2**30
