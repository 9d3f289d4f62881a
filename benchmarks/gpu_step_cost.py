"""Step cost of the fine-tuning methods at Stable Diffusion 1.5 scale: iterations/s and peak GPU memory.

Three rows from ONE run over the same models:
  distill              — the lower level only: L_ft = L_diff + 2 L_outKD + 0.1 L_featKD (eq. 1, 3, 4, 8);
  bilevel_alternating  — a lower step every iteration and an ESD upper step after every K = 10th (seed paper
                         Sec. 4, the released code's solver), two AdamW optimisers over one set of weights;
  unlearn_phase        — the upper level alone (two_stage's second stage): one ESD step per iteration.
Each row runs the recipe's own code: `safeprune.bilevel.training.build_training` (optimisers, Accelerate,
`DiffusionProblem` with `safeprune.losses` and `safeprune.unlearning.esd`) stepped by the solvers of
`safeprune.bilevel`; nothing is re-implemented here.

Models: a random-weight UNet of the SD 1.5 architecture (tests/assets/sd15_unet_config.json) as the frozen
teacher (bf16, as in configs/sd21.yaml) and its `channels`-pruned copy (ratio 0.3) as the student. Random
latents (4 x 64 x 64 = 512 px) and random text embeddings (77 x 768) stand in for the VAE and the text encoder:
the benchmark is about the UNet step. Mixed precision: bf16 autocast (Accelerate).

Timing: warm-up iterations are excluded (for alternating they end with an upper step, so both optimisers'
states exist before timing); `torch.cuda.synchronize()` brackets every timed block. Peak memory is
`torch.cuda.max_memory_allocated()` over a row's warm-up + timed block, reset before it, and absolute: it
includes the models and every optimiser state alive. Rows run in the order distill, unlearn_phase,
alternating, so each holds what a real run of it holds (two_stage's unlearning follows its distillation).

Budget: about 5 minutes on one H100 including model construction (iterations below; see RESULTS.md).
`--device cpu --tiny` is a smoke mode for CI: the same block layout at tiny width and 8 x 8 latents.

Usage:
  python benchmarks/gpu_step_cost.py --out results.json                       # one GPU, SD-1.5 size, batch 8
  python benchmarks/gpu_step_cost.py --device cpu --tiny --out smoke.json     # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

K = 10  # upper step after every K-th lower step (the paper's setting)
SD15_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "assets" / "sd15_unet_config.json"
# The SD 1.5 layout (4 stages, cross-attention in the first three, a mid block) at CPU-smoke width.
TINY = {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "attention_head_dim": 2, "cross_attention_dim": 32, "sample_size": 8}
TINY_TOKENS, SD_TOKENS = 8, 77  # text tokens per prompt
POOL = 64  # latents per pool; the loop draws from it with replacement


def unet_config(tiny: bool) -> dict:
    config = {k: v for k, v in json.loads(SD15_CONFIG.read_text()).items() if not k.startswith("_")}
    return config | TINY if tiny else config


def build(args) -> tuple[object, dict]:
    """(the recipe's Training, a description) for random SD-1.5-architecture teacher and pruned student."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from safeprune.bilevel.problem import Pools
    from safeprune.bilevel.training import build_training
    from safeprune.config import PruneConfig, load_config
    from safeprune.data.datasets import LatentPool
    from safeprune.models.hooks import match_features
    from safeprune.models.toy import SCHEDULER_CONFIG
    from safeprune.pruning import prune
    from safeprune.pruning.measure import count_parameters
    from safeprune.unlearning import build_unlearning
    from safeprune.utils import DTYPES

    cfg = load_config(base={"seed": 0, "device": args.device, "finetune": {
        "batch_size": args.batch, "upper": {"batch_size": args.batch, "every": K}, "unlearn": "esd",
        "mixed_precision": args.mixed_precision, "teacher_dtype": args.teacher_dtype,
        "gradient_checkpointing": args.gradient_checkpointing}})
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    device = accelerator.device
    torch.manual_seed(0)
    with device:  # random init directly on the device (seconds instead of minutes for 0.9 B weights on CPU)
        teacher = UNet2DConditionModel(**unet_config(args.tiny))
    student, _ = prune(teacher, "channels", PruneConfig(ratio=args.ratio))  # traced on the teacher's device
    teacher = teacher.eval().requires_grad_(False)
    if args.teacher_dtype != "fp32":  # the recipe's frozen low-precision teacher
        teacher = teacher.to(DTYPES[args.teacher_dtype])
    student = student.to(device).train()

    # Random pools stand in for VAE latents of images and text-encoder embeddings of prompts.
    c, size, width = teacher.config.in_channels, teacher.config.sample_size, teacher.config.cross_attention_dim
    tokens = TINY_TOKENS if args.tiny else SD_TOKENS
    g = torch.Generator().manual_seed(0)
    latents = LatentPool(torch.randn(POOL, c, size, size, generator=g), 0.1 * torch.rand(POOL, c, size, size, generator=g),
                         [""] * POOL, [{}] * POOL).to(device)
    # Embedding rows: 0 = the empty prompt, 1..5 = captions, 6 = the concept target, 7 = its anchor.
    pools = Pools(lower=latents, lower_prompt=torch.randint(1, 6, (POOL,), generator=g),
                  embeddings=torch.randn(8, tokens, width, generator=g).to(device), null_prompt=0, concept=latents,
                  concept_target=torch.full((POOL,), 6), concept_anchor=torch.full((POOL,), 7))
    pairs = match_features(teacher, student, pools.embeddings[0])
    training = build_training(cfg, accelerator, student, teacher, DDPMScheduler(**SCHEDULER_CONFIG), pools, pairs,
                              build_unlearning("esd", cfg.finetune.unlearn))
    info = {"teacher_params_m": round(count_parameters(teacher) / 1e6, 1), "student_params_m": round(count_parameters(student) / 1e6, 1),
            "student": f"channels ratio {args.ratio}", "latent": [c, size, size], "text": [tokens, width],
            "feature_blocks": len(pairs)}
    return training, info


def time_row(method, training, start: int, warmup: int, iters: int, device: torch.device) -> dict:
    """Warm-up, then `iters` timed iterations of `method` from global step `start` + warmup."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(start, start + warmup):
        method(step, training.problem, training.update)
    before = dict(training.problem.counts)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(start + warmup, start + warmup + iters):
        method(step, training.problem, training.update)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    passes = {k: (training.problem.counts[k] - before[k]) / iters for k in before}
    return {"iters": iters, "it_per_s": round(iters / seconds, 4), "s_per_it": round(seconds / iters, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "images_per_it": {k: round(v, 2) for k, v in passes.items()}}


def run(args) -> dict:
    from safeprune.bilevel import Alternating, Distill, TwoStage

    t0 = time.perf_counter()
    training, info = build(args)
    device = training.accelerator.device
    built_s = time.perf_counter() - t0
    huge = 10**9  # budgets far beyond the run: rows are cut by the iteration counts, not the method
    # Start steps chosen so that alternating's warm-up ends with an upper step ((step + 1) % K == 0) and its
    # timed block holds iters / K of them.
    rows = {
        "distill": (Distill(huge), 0),
        "unlearn_phase": (TwoStage(0, huge), 0),
        "bilevel_alternating": (Alternating(huge, K), K - args.warmup),
    }
    results = {name: time_row(method, training, start, args.warmup, args.iters, device)
               for name, (method, start) in rows.items()}
    base = results["distill"]["s_per_it"]
    for row in results.values():
        row["cost_vs_distill"] = round(row["s_per_it"] / base, 3)
    return {"benchmark": "gpu_step_cost",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "arch": "sd15-tiny" if args.tiny else "sd15", **info, "batch": args.batch,
            "mixed_precision": args.mixed_precision, "teacher_dtype": args.teacher_dtype,
            "gradient_checkpointing": args.gradient_checkpointing, "K": K, "warmup": args.warmup,
            "build_s": round(built_s, 1), "rows": results, "total_s": round(time.perf_counter() - t0, 1)}


def table(result: dict) -> str:
    lines = [(f"{result['arch']} on {result['device']}, batch {result['batch']}, {result['mixed_precision']}, "
              f"student {result['student_params_m']} M / teacher {result['teacher_params_m']} M params"),
             f"{'method':<22}{'it/s':>9}{'s/it':>9}{'x distill':>11}{'peak GiB':>10}"]
    for name, row in result["rows"].items():
        peak = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"
        lines.append(f"{name:<22}{row['it_per_s']:>9.3f}{row['s_per_it']:>9.3f}{row['cost_vs_distill']:>11.3f}{peak:>10}")
    lines.append(f"models built in {result['build_s']} s; total {result['total_s']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu")
    parser.add_argument("--tiny", action="store_true", help="scaled-down SD-1.5 layout, 8x8 latents (CPU smoke)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8; --tiny: 2)")
    parser.add_argument("--iters", type=int, default=None, help=f"timed iterations per row, a multiple of K={K} "
                                                                "(default 20; --tiny: 10)")
    parser.add_argument("--warmup", type=int, default=3, help=f"untimed iterations before each row (1..{K})")
    parser.add_argument("--ratio", type=float, default=0.3, help="channels pruning ratio of the student")
    parser.add_argument("--mixed-precision", default=None, help="bf16 (default on cuda) | fp16 | no (default on cpu)")
    parser.add_argument("--teacher-dtype", default=None, help="bf16 (default on cuda) | fp16 | fp32 (default on cpu)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute student activations")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu --tiny for the smoke mode")
    args.batch = args.batch or (2 if args.tiny else 8)
    args.iters = args.iters or (K if args.tiny else 2 * K)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    args.teacher_dtype = args.teacher_dtype or ("bf16" if cuda else "fp32")
    if args.iters % K or not 1 <= args.warmup <= K:
        parser.error(f"--iters must be a multiple of {K} and --warmup in 1..{K} (so alternating's rows hold whole "
                     "periods of upper steps)")
    result = run(args)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
