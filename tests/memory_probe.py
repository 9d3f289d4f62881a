"""Measure the peak memory of two bilevel iterations on CPU, in a fresh process (run by test_memory.py).

Prints one JSON line: {"peak_bytes": [RSS high-water mark (reset per mode) - RSS before the models were
built, per mode (gradient checkpointing on/off)]}. glibc is told (by the
test, MALLOC_MMAP_THRESHOLD_) to serve every block >= 64 KiB with mmap, so freed tensors leave the RSS at
once and the high-water mark tracks live tensor memory. A tiny warm-up step first loads the kernels and
code pages, so they are part of the baseline, not of the measured peak.
The iteration follows the recipe's order (safeprune.bilevel.problem): teacher forward without gradients
with feature capture, student forward and backward of L_ft, a lower AdamW step, gradients cleared; then
the upper step: teacher on the stacked (target, null) conditions, student forward and backward, upper AdamW.
"""

import gc
import json
import os
import sys

import torch


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Restart the kernel's RSS high-water mark at the current RSS (Linux >= 4.0).

    ru_maxrss alone counts from process start: the import-time peak of torch's library pages, later
    reclaimed when the machine is busy, would then pass for training memory.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def iteration(student, teacher, opt_lower, opt_upper, pools, spec, pairs):
    from safeprune.models.hooks import capture_features

    b, size = spec["batch"], spec["latent"]
    lat, emb = pools
    x = lat[:b, :4] + lat[:b, 4:] * torch.randn(b, 4, size, size)  # a draw from the pool's Gaussians
    t = torch.randint(1000, (b,))
    e = emb[:b]
    with torch.no_grad(), capture_features(teacher, [p[0] for p in pairs]) as tf:
        t_out = teacher(x, t, encoder_hidden_states=e).sample
    with capture_features(student, [p[1] for p in pairs]) as sf:
        s_out = student(x, t, encoder_hidden_states=e).sample
    loss = (s_out - x).pow(2).mean() + 2 * (s_out - t_out).pow(2).mean()
    loss = loss + 0.1 * sum((sf[s] - tf[q]).pow(2).mean() for q, s in pairs) / len(pairs)
    loss.backward()
    del tf, sf, t_out, s_out, loss
    opt_lower.step()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        eps = teacher(x.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=emb[: 2 * b]).sample.chunk(2)
    target = eps[1] - (eps[0] - eps[1])  # ESD negative guidance, eta = 1
    loss = (student(x, t, encoder_hidden_states=e).sample - target).pow(2).mean()
    loss.backward()
    del loss, eps, target
    opt_upper.step()
    student.zero_grad(set_to_none=True)


def main(spec):
    from diffusers import UNet2DConditionModel

    from safeprune.models.hooks import match_blocks

    torch.manual_seed(0)
    cfg = spec["config"]

    def models(c):
        return UNet2DConditionModel(**c).train(), UNet2DConditionModel(**c).eval().requires_grad_(False)

    def run(c, batch, latent, n, checkpointing):
        student, teacher = models(c)
        if checkpointing:
            student.enable_gradient_checkpointing()
        pools = (torch.randn(spec["pool"], 8, latent, latent),
                 torch.randn(spec["pool"], spec["tokens"], c["cross_attention_dim"]))
        opts = [torch.optim.AdamW(student.parameters(), lr=1e-6, fused=True) for _ in range(2)]
        s = {**spec, "batch": batch, "latent": latent}
        for _ in range(n):
            iteration(student, teacher, *opts, pools, s, match_blocks(teacher, student))

    # warm-up on a tiny copy of the architecture (kernels, allocator pools, code pages)
    tiny = {**cfg, "block_out_channels": [16] * len(cfg["block_out_channels"]), "norm_num_groups": 4}
    run(tiny, 2, 8, 1, True)
    run(tiny, 2, 8, 1, False)
    peaks = []
    for checkpointing in spec["checkpointing"]:
        gc.collect()
        reset_peak()
        base = rss()
        run(cfg, spec["batch"], spec["latent"], 2, checkpointing)
        peaks.append(peak_rss() - base)
    print(json.dumps({"peak_bytes": peaks}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(json.loads(sys.argv[1]))
