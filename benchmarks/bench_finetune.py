"""Per-iteration cost of the fine-tuning methods, as ratios to plain distillation measured in one run.

Methods (the recipe's own step functions, problem and update rule; random-weight UNets, random latent
and embedding pools, so only the loop is measured): distill, bilevel alternating (K = 10), bilevel
penalty (K = 10), and the two phases of two_stage (distill phase, unlearn phase). Reports wall time per
iteration, student passes per iteration, and peak memory above the start of each timed block (CPU: the
process's resident-set high-water mark, reset per block; GPU: torch's peak allocation). Blocks are run
in interleaved, rotated rounds; the median wall time and the minimum CPU time of this process are kept,
which damps noise from other processes on the machine (on a shared CPU the CPU-time ratio decides).

Floor: bilevel alternating <= 1.15x distill per iteration (the paper: about the cost of plain
fine-tuning); aim 1.10x. Architectures: `toy` (the toy teacher, `channels`-pruned student), `sd-mini`
(the SD-1.5 block layout at reduced width, 32x32 latents, 77 x 768 text tokens, BK-SDM `base` student),
`sd15` (the real SD-1.5 UNet config, 64x64 latents; for a GPU, e.g. --device cuda --mixed-precision bf16).

Usage: .venv/bin/python benchmarks/bench_finetune.py [--arch toy,sd-mini] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

FLOOR = 1.15  # bilevel alternating / distill, per iteration
K = 10  # upper step every K-th iteration (alternating) / K inner steps (penalty)
SD15_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "assets" / "sd15_unet_config.json"


def _toy() -> dict:
    from safeprune.models.toy import UNET_CONFIG

    return dict(UNET_CONFIG)


def _sd_mini() -> dict:
    """SD 1.5's block layout (4 stages, 2 layers, attention in 3, 8 heads, 768-wide text) at 1/5 of its width."""
    config = _sd15()
    config.update(sample_size=32, block_out_channels=[64, 128, 256, 256])
    return config


def _sd15() -> dict:
    config = json.loads(SD15_CONFIG.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


# name -> (UNet config, text tokens, default batch per step, pruning method of the student, prune overrides)
ARCHS = {
    "toy": (_toy, 24, 16, "channels", {"ratio": 0.3}),
    "sd-mini": (_sd_mini, 77, 2, "blocks", {"blocks": {"preset": "base"}}),
    "sd15": (_sd15, 77, 8, "blocks", {"blocks": {"preset": "base"}}),
}


# ----------------------------------------------------------------------------- memory probes


def _trim_heap() -> None:
    gc.collect()
    try:  # give freed blocks back to the OS so the next block's peak is its own
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory (MiB) above the start of a block: torch's allocator on GPU, VmHWM on Linux CPUs."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        self.mib = (peak - self.base) / 2**20


# ----------------------------------------------------------------------------- setup


def build(arch: str, device: str, mixed_precision: str, batch: int | None, seed: int = 0):
    """(training, method factories, description) for one architecture."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from safeprune.bilevel import Alternating, Distill, Penalty, TwoStage
    from safeprune.bilevel.problem import Pools
    from safeprune.bilevel.training import build_training
    from safeprune.config import PruneConfig, from_dict, load_config
    from safeprune.data.datasets import LatentPool
    from safeprune.models.hooks import match_features
    from safeprune.models.toy import SCHEDULER_CONFIG
    from safeprune.pruning import prune
    from safeprune.pruning.measure import count_parameters
    from safeprune.unlearning import build_unlearning

    config_fn, tokens, default_batch, prune_method, prune_overrides = ARCHS[arch]
    batch = batch or default_batch
    cfg = load_config(base={"seed": seed, "device": device, "finetune": {
        "batch_size": batch, "upper": {"batch_size": batch, "every": K}, "mixed_precision": mixed_precision}})
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
    dev = accelerator.device
    torch.manual_seed(seed)
    teacher = UNet2DConditionModel(**config_fn())
    student, _ = prune(teacher, prune_method, from_dict(PruneConfig, prune_overrides))
    teacher = teacher.to(dev).eval().requires_grad_(False)
    student = student.to(dev).train()

    # Random pools stand in for VAE latents and text embeddings: the loop never sees images or text.
    c, size, width = teacher.config.in_channels, teacher.config.sample_size, teacher.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    pool = LatentPool(torch.randn(64, c, size, size, generator=g), 0.1 * torch.rand(64, c, size, size, generator=g),
                      [""] * 64, [{}] * 64).to(dev)
    pools = Pools(lower=pool, lower_prompt=torch.randint(1, 6, (64,), generator=g),
                  embeddings=torch.randn(8, tokens, width, generator=g).to(dev), null_prompt=0, concept=pool,
                  concept_target=torch.full((64,), 6), concept_anchor=torch.full((64,), 7))
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    pairs = match_features(teacher, student, pools.embeddings[0])
    training = build_training(cfg, accelerator, student, teacher, scheduler, pools, pairs,
                              build_unlearning("esd", cfg.finetune.unlearn))
    huge = 10**9
    methods = {
        "distill": Distill(huge),
        "bilevel_alternating": Alternating(huge, K),
        "bilevel_penalty": Penalty(huge, K, 1.0, 1.0),
        "two_stage_distill_phase": TwoStage(huge, huge),
        "two_stage_unlearn_phase": TwoStage(0, huge),
    }
    info = {"arch": arch, "batch": batch, "teacher_params_m": round(count_parameters(teacher) / 1e6, 2),
            "student_params_m": round(count_parameters(student) / 1e6, 2), "student": f"{prune_method} {prune_overrides}",
            "feature_blocks": len(pairs), "latent": [c, size, size], "text_tokens": [tokens, width]}
    return training, methods, info


def run_block(method, training, start: int, n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for n iterations of `method` from global step `start`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(start, start + n):
        method(step, training.problem, training.update)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(arch: str, device: str, mixed_precision: str, batch: int | None, rounds: int, iters: int) -> dict:
    training, methods, info = build(arch, device, mixed_precision, batch)
    dev = training.accelerator.device
    step = 0
    for method in methods.values():  # warm-up: allocator, optimiser states, lazy imports
        run_block(method, training, step, K, dev)
        step += K
    times = {name: [] for name in methods}
    cpu_times = {name: [] for name in methods}
    passes = {}
    names = list(methods)
    for r in range(rounds):  # interleaved and rotated, so slow phases of a shared machine hit every method alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            method = methods[name]
            before = dict(training.problem.counts)
            wall, cpu = run_block(method, training, step, iters, dev)
            times[name].append(wall / iters)
            cpu_times[name].append(cpu / iters)
            step += iters
            passes[name] = {k: (training.problem.counts[k] - before[k]) / iters / info["batch"] for k in before}
    memory = {}
    for name, method in methods.items():
        with PeakMemory(dev) as probe:
            run_block(method, training, step, K, dev)
        step += K
        memory[name] = round(probe.mib, 1)
    # `distill` and two_stage's distill phase run the same code: their mean is the baseline, and their
    # ratio (`distill_repeatability`, ideally 1) shows how much noise the machine added.
    per_iter = {name: statistics.median(values) for name, values in times.items()}
    cpu_iter = {name: min(values) for name, values in cpu_times.items()}  # interference only ever adds time
    baseline = {key: (t["distill"] + t["two_stage_distill_phase"]) / 2 for key, t in (("wall", per_iter),
                                                                                        ("cpu", cpu_iter))}
    ratio = {name: round(v / baseline["wall"], 3) for name, v in per_iter.items()}
    cpu_ratio = {name: round(v / baseline["cpu"], 3) for name, v in cpu_iter.items()}
    repeatability = {"wall": round(per_iter["two_stage_distill_phase"] / per_iter["distill"], 3),
                     "cpu": round(cpu_iter["two_stage_distill_phase"] / cpu_iter["distill"], 3)}
    # On a CPU shared with other jobs, wall time measures the neighbours too; this process's CPU time (one
    # thread) is far less sensitive to them, so it decides the floor there. On a GPU, wall time decides.
    decisive = cpu_ratio if dev.type == "cpu" else ratio
    mem_ratio = {name: round(v / memory["distill"], 3) if memory["distill"] > 0 else None
                 for name, v in memory.items()}
    return {**info, "per_iter_s": {k: round(v, 4) for k, v in per_iter.items()}, "ratio_vs_distill": ratio,
            "cpu_per_iter_s": {k: round(v, 4) for k, v in cpu_iter.items()}, "cpu_ratio_vs_distill": cpu_ratio,
            "spread_s": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()},
            "student_passes_per_iter": {k: {p: round(x, 3) for p, x in v.items()} for k, v in passes.items()},
            "peak_mem_mib": memory, "peak_mem_ratio_vs_distill": mem_ratio,
            "distill_repeatability": repeatability, "ok": decisive["bilevel_alternating"] <= FLOOR}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="toy,sd-mini", help=f"comma-separated: {', '.join(ARCHS)}")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--mixed-precision", default="no", help="no | bf16 | fp16 (GPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default per architecture)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds (wall: median, CPU: min)")
    parser.add_argument("--iters", type=int, default=K, help=f"iterations per timed block (a multiple of K={K})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 = the CI setting)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{args.threads} threads"
    results = [measure(arch, args.device, args.mixed_precision, args.batch, args.rounds, args.iters)
               for arch in args.arch.split(",")]
    result = {"benchmark": "finetune_per_iteration", "device": device_name, "mixed_precision": args.mixed_precision,
              "K": K, "floor_alternating_vs_distill": FLOOR, "results": results, "ok": all(r["ok"] for r in results)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
