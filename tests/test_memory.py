"""safeprune.memory: the pre-launch estimate against a measured CPU peak, and its parts at SD scale (meta)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safeprune.config import load_config
from safeprune.memory import estimate_memory, meta_unet, profile_activations
from safeprune.models import toy

ASSETS = Path(__file__).resolve().parent / "assets"
PROBE = Path(__file__).resolve().parent / "memory_probe.py"
# The toy architecture at 32x32 latents: big enough (~100-200 MiB) that allocator noise stays small.
SMALL = {**{k: list(v) if isinstance(v, tuple) else v for k, v in toy.UNET_CONFIG.items()}, "sample_size": 32}
BATCH, LATENT, TOKENS, POOL = 6, 32, 24, 32


def _cfg(checkpointing: bool):
    return load_config(None, [f"finetune.batch_size={BATCH}", f"finetune.upper.batch_size={BATCH}",
                              f"finetune.data.pool={POOL}", "finetune.data.concept_pool=1",
                              f"finetune.gradient_checkpointing={str(checkpointing).lower()}"])


@pytest.mark.slow  # ~25 s: one subprocess (imports + two bilevel iterations per mode)
def test_estimate_within_25_percent_of_the_measured_cpu_peak():
    modes = [True, False]  # checkpointing first: the smaller peak, so each run raises the high-water mark
    spec = {"config": SMALL, "batch": BATCH, "latent": LATENT, "tokens": TOKENS, "pool": POOL, "checkpointing": modes}
    # A clean environment: variables that earlier tests in this process set (Accelerate's, torch's) must not
    # change the probe; glibc serves blocks >= 64 KiB by mmap so freed memory leaves the RSS at once.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(PROBE), json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
    unet = meta_unet(SMALL)
    for checkpointing, peak in zip(modes, measured):
        est = estimate_memory(_cfg(checkpointing), unet, unet, latent_size=LATENT, text_tokens=TOKENS, prompts=POOL)
        assert abs(est.training / peak - 1) < 0.25, (checkpointing, est.parts, peak)


def test_checkpointing_and_bf16_shrink_sd21_activations_on_meta():
    unet = meta_unet(json.loads((ASSETS / "sd21_unet_config.json").read_text()))
    fp32 = profile_activations(unet, 1, 64, 77, "no")
    bf16 = profile_activations(unet, 1, 64, 77, "bf16")
    assert fp32.total(True) < fp32.total(False) / 3  # checkpointing keeps block inputs, not their insides
    assert bf16.total(False) < fp32.total(False)
    assert 0.5 < fp32.total(False) / 2**30 < 4  # GiB per 512 px image; checked loosely, the CPU test is exact


def test_sd21_preset_estimate_parts():
    cfg = load_config("sd21")
    unet = meta_unet(json.loads((ASSETS / "sd21_unet_config.json").read_text()))
    est = estimate_memory(cfg, unet, unet, latent_size=cfg.finetune.resolution // 8, processes=4)
    n = est.student_params
    assert 860e6 < n < 870e6  # the SD 2.1 UNet
    assert est.parts["optimizer"] == 16 * n  # lower + upper AdamW (esd moves every weight), 8 bytes each
    assert est.parts["teacher"] == 2 * n and est.parts["ddp_buckets"] == 4 * n
    assert est.peak < 80 * 2**30  # the paper's 16 images per A100-80GB fit with checkpointing + bf16
    assert "estimated peak memory per GPU" in est.summary()
    cheap = estimate_memory(load_config("sd21", ["finetune.optimizer=adamw8bit"]), unet, unet, latent_size=64)
    assert cheap.parts["optimizer"] == 4 * n


@pytest.mark.parametrize("name", ["adamw8bit"])
def test_8bit_adam_without_bitsandbytes_is_a_one_line_error(name):
    import importlib.util

    import torch

    from safeprune.errors import UserError
    from safeprune.optim import build_optimizer

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(UserError, match="needs bitsandbytes") as err:
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0)
    assert "\n" not in str(err.value)


def test_an_unknown_optimizer_fails_the_dry_run_and_the_run_before_its_folder(tmp_path, capsys):
    from safeprune.cli import main
    from safeprune.errors import UserError
    from safeprune.recipes.finetune import finetune

    assert main(["finetune", "--dry-run", "finetune.optimizer=sgd"]) == 2
    assert "unknown optimizer 'sgd'; choose one of: adamw, adamw8bit" in capsys.readouterr().err
    cfg = load_config(None, ["finetune.optimizer=sgd", f"paths.student={tmp_path / 's'}", f"paths.out={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="unknown optimizer 'sgd'"):
        finetune(cfg)
    assert not (tmp_path / "o").exists()
