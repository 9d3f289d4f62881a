"""Levers on bilevel's quality cost (issue 15, item 4): each lever alone, at the same budget, on DEVELOPMENT seeds.

For each concept (`--concepts`, the atlas's KIND:NAME) and development seed, one `distill` run (the reference of
the fd ratio) and one `bilevel` run per lever, all with the functions and settings of `safeprune demo`
(safeprune.recipes.demo.finetune_row, so bilevel takes the demo's committed `demo.overrides.bilevel`) and the
sweep's development prompts (benchmarks/sweep_baselines.py: `dev_world`), channels pruning, one pruned student.
A lever is a list of `section.field=value` overrides on bilevel's run (LEVERS; `--lever NAME=a,b` adds one, e.g.
a combination). Every lever keeps the lower budget (finetune.max_steps) and the upper budget (upper steps x upper
batch = 30 x 16 concept images): the paper's penalty setting K = 20 takes 15 upper steps of 32.

The evaluation is the atlas's (valid, leakage, forget_valid, retention, adherence, fd; no resurgence, no held-out).
Resumable: one JSON line per (concept, seed, lever) in OUT/levers.jsonl (a line's overrides must match the lever's
today: a changed lever is an error, not a silent mix); OUT/levers.md and OUT/levers.png (leakage against fd /
distill fd per run) are rewritten after every run and regenerate from the jsonl alone (`--report-only`).

    OMP_NUM_THREADS=1 python benchmarks/levers.py --out runs/levers --concepts style:striped style:checkered
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
import leak_atlas  # noqa: E402
from sweep_baselines import dev_world  # noqa: E402

from safeprune.errors import UserError, check  # noqa: E402

# lever -> overrides of bilevel's run (on the demo's bilevel settings). `base` is today's bilevel.
LEVERS: dict[str, list[str]] = {
    "base": [],
    "anchor_xt": ["finetune.upper.images=anchor"],  # x_t = noised anchor images (the same scene without the concept)
    "student_xt": ["finetune.upper.images=student"],  # x_t = the student's own partial samples (ESD, on-policy)
    "preserve": ["finetune.upper.preserve=1.0"],  # + student = teacher on retained captions at the same x_t
    # the paper's penalty settings (lambda 100, K 20), 15 outer steps of 32 concept images = the same upper budget
    "penalty_paper": ["finetune.solver.name=penalty", "finetune.solver.penalty_lambda=100", "finetune.upper.every=20",
                      "finetune.upper.batch_size=32"],
    # the paper's upper-lr warm-up: 250 of its 2,000 upper steps (12.5 %) = 4 of our 30
    "warmup": ["finetune.upper.warmup_steps=4"],
    # ESD-x: the upper step moves only the text-reading attention (esd_anchor keeps its anchor reference)
    "xattn": ["finetune.unlearn.params=xattn"],
}
METRICS = ("leakage", "forget_valid", "retention", "fd")
# bilevel as the levers were measured against: the demo's bilevel of 2026-12-01 (upper lr 5e-4, x_t = noised concept
# images), pinned, since the demo's default now includes the chosen lever (a lever's own fields win over this entry:
# safeprune.config._explicit_wins)
BASE = ("eval.heldout=false", "demo.overrides.bilevel=[finetune.upper.lr=5e-4]")


def parse_lever(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    check(bool(sep) and name.strip() and overrides.strip(), f"--lever {text!r}: write NAME=section.field=value,...")
    return name.strip(), [o.strip() for o in overrides.split(",") if o.strip()]


def run(out: Path, concepts: list[str], seeds: list[int], levers: dict[str, list[str]], tiny: bool,
        heldout: bool = False) -> None:
    from safeprune.data.toyworld import ToyWorld
    from safeprune.eval.judge import load_judge
    from safeprune.recipes import demo

    jsonl = out / "levers.jsonl"
    done = {(r["concept"], r["seed"], r["row"]): r for r in leak_atlas.read_records(jsonl)}
    for (concept, seed, row), rec in done.items():
        if row in levers and rec["overrides"] != levers[row]:
            raise UserError(f"{jsonl}: lever {row!r} ran with {rec['overrides']}, today it is {levers[row]}; use "
                            "another --out")
    judge = load_judge()
    student, timings = out / "student", {}
    if not (student / "prune_report.json").is_file():
        shutil.rmtree(student, ignore_errors=True)
        demo.prune_once(leak_atlas.build_config(concepts[0], "channels", list(BASE), tiny), student, timings)
    prune_report = json.loads((student / "prune_report.json").read_text())
    # seed-major: a partial run has every lever on the first seed of every concept
    for seed in seeds:
        for concept in concepts:
            for row in ["distill", *levers]:
                if (concept, seed, row) in done:
                    continue
                overrides = [] if row == "distill" else levers[row]
                cfg = leak_atlas.build_config(concept, "channels", [*BASE, *overrides], tiny)
                run_dir = out / "runs" / concept.replace(":", "_") / f"seed{seed}" / row
                shutil.rmtree(run_dir, ignore_errors=True)  # a run this script started and did not record
                t = time.perf_counter()
                method = "distill" if row == "distill" else "bilevel"
                # held-out: the demo's own world and prompts (safeprune.recipes.demo), never the development ones
                world = ToyWorld(cfg.toyworld, seed=cfg.seed) if heldout else dev_world(cfg, seed)
                metrics, _, _ = demo.finetune_row(cfg, method, seed, student, run_dir, world, judge,
                                                  None, None, {}, prune_report, timings)
                rec = {"concept": concept, "seed": seed, "row": row, "overrides": overrides, "heldout": heldout,
                       **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                       "wall_s": round(time.perf_counter() - t, 1)}
                leak_atlas.append_record(jsonl, rec)
                done[concept, seed, row] = rec
                print(json.dumps(rec), flush=True)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                write_report(out)


SOURCES = ("concept", "anchor", "student")  # finetune.upper.images values the target diagnostic compares
T_BUCKETS = ((0, 400), (400, 700), (700, 1000))  # timestep ranges of the diagnostic's table


def target_content(student: Path, concept: str, n: int = 96, seed: int = 1000, tiny: bool = False) -> dict:
    """The hypothesis behind re-teaching, measured directly: what the upper level's REGRESSION TARGET shows.

    For each x_t source (SOURCES), one upper batch of `n` is drawn exactly as training draws it
    (DiffusionProblem.upper_batch, the demo's bilevel loss; the pruned `student` samples the on-policy x_t), the
    target prediction is turned into its clean-image estimate x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), decoded by
    the VAE and read by the judge: the share of targets that show the forbidden concept, per timestep range. A
    target that shows the concept teaches it to a student that had lost it."""
    from safeprune.backbones import BACKBONES
    from safeprune.bilevel.pools import build_pools
    from safeprune.bilevel.problem import DiffusionProblem, step_generator
    from safeprune.eval.judge import load_judge
    from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss
    from safeprune.models.io import load_unet
    from safeprune.models.shipped import load_teacher
    from safeprune.unlearning import build_unlearning

    teacher_pipe, judge = load_teacher(), load_judge()
    teacher = teacher_pipe.unet.eval().requires_grad_(False)
    unet = load_unet(student / "model" if (student / "model").is_dir() else student).eval()
    scheduler = BACKBONES["sd"].training_scheduler(teacher_pipe)
    (kind, name), = leak_atlas.parse_concept(concept)
    out = {}
    for source in SOURCES:
        cfg = leak_atlas.build_config(concept, "channels", [*BASE, f"finetune.upper.images={source}"], tiny)
        unlearning = build_unlearning(cfg.finetune.unlearn.name, cfg.finetune.unlearn)
        pools, _ = build_pools(cfg, teacher_pipe, unlearning, None, None, "cpu")
        problem = DiffusionProblem(student=unet, student_core=unet, teacher=teacher, scheduler=scheduler,
                                   lower_loss=LowerLevelLoss(DenoisingLoss(scheduler), FeatureKD(())), pools=pools,
                                   unlearning=unlearning, upper_batch_size=8, seed=seed, upper_images=source,
                                   sample_steps=cfg.finetune.upper.sample_steps,
                                   sample_guidance=cfg.finetune.upper.sample_guidance)
        images, t = [], []
        with torch.no_grad():
            for step in range(n // 8):  # batches of 8, as upper steps draw them (a student batch shares one t)
                x_t, timesteps, _, target = problem.upper_batch(step_generator(seed, 0, step, "upper"))
                a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
                x0 = (x_t - (1 - a).sqrt() * target) / a.sqrt()
                images.append(teacher_pipe.vae.decode(x0 / teacher_pipe.vae.config.scaling_factor).sample)
                t.append(timesteps)
        images, t = torch.cat(images), torch.cat(t)
        judged = judge.predict(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
        shows = np.array([label == name for label in judged[kind]])
        out[source] = {f"t{lo}-{hi}": float(shows[(t >= lo) & (t < hi)].mean()) if ((t >= lo) & (t < hi)).any()
                       else None for lo, hi in T_BUCKETS} | {"all": float(shows.mean())}
    return out


def suppresses(distill: dict) -> bool:
    """Is there something to suppress at this seed? The demo's floor (distill leaks >= LEAK_FLOOR; the toy
    teacher's own leakage is 1.0, so the share-of-teacher rule adds nothing here)."""
    from safeprune.recipes.demo import LEAK_FLOOR

    return distill["leakage"] >= LEAK_FLOOR


def meets(rec: dict, distill: dict) -> bool:
    """The item-4 goal at one seed. Where distill leaks: leakage <= 0.1, forget-prompt valid >= 0.9 and fd <= 1.1x
    distill's; where it does not, the demo's "no harm": leakage <= distill's + 0.05, forget valid and retention
    >= distill's - 0.05, fd <= 1.1x distill's (safeprune.recipes.demo.judge_claims)."""
    if suppresses(distill):
        return rec["leakage"] <= 0.1 and rec["forget_valid"] >= 0.9 and rec["fd"] <= 1.1 * distill["fd"]
    return (rec["leakage"] <= distill["leakage"] + 0.05 and rec["forget_valid"] >= distill["forget_valid"] - 0.05
            and rec["retention"] >= distill["retention"] - 0.05 and rec["fd"] <= 1.1 * distill["fd"])


def write_report(out: Path) -> Path:
    """OUT/levers.md and OUT/levers.png from OUT/levers.jsonl alone."""
    records = leak_atlas.read_records(out / "levers.jsonl")
    check(bool(records), f"{out / 'levers.jsonl'} has no results yet; run the benchmark first")
    distill = {(r["concept"], r["seed"]): r for r in records if r["row"] == "distill"}
    concepts = list(dict.fromkeys(r["concept"] for r in records))
    rows = list(dict.fromkeys(r["row"] for r in records if r["row"] != "distill"))
    where = ("held-out seeds and the demo's prompts (levers chosen on development seeds)"
             if all(r.get("heldout") for r in records) else "development seeds")
    md = [f"# Levers on bilevel's quality cost ({where})", "",
          "Per seed: `leakage / forget valid / retention / fd (fd / distill fd)`; `goal` on every seed: where distill "
          "leaks, leakage <= 0.1, forget valid >= 0.9 and fd <= 1.1x distill's; where it does not, no harm (leakage "
          "<= distill + 0.05, forget valid and retention >= distill - 0.05, fd <= 1.1x distill's). Written by "
          "benchmarks/levers.py from levers.jsonl.", ""]
    for concept in concepts:
        seeds = sorted({r["seed"] for r in records if r["concept"] == concept})
        leaky = [suppresses(distill[concept, sd]) for sd in seeds if (concept, sd) in distill]
        rule = "suppress (distill leaks)" if leaky and all(leaky) else \
            "no harm (distill does not leak)" if leaky and not any(leaky) else "per seed"
        md += [f"## {concept}: {rule}", "", "| lever | overrides | " + " | ".join(f"seed {s}" for s in seeds) + " | goal |",
               "|---|---|" + "---|" * (len(seeds) + 1)]
        for row in ["distill", *(r for r in rows if any((x["concept"], x["row"]) == (concept, r) for x in records))]:
            cells, ok, overrides = [], [], ""
            for s in seeds:
                rec = next((r for r in records if (r["concept"], r["seed"], r["row"]) == (concept, s, row)), None)
                d = distill.get((concept, s))
                if rec is None:
                    cells.append("-")
                    continue
                overrides = " ".join(f"`{o}`" for o in rec.get("overrides", [])) or "-"
                ratio = f" ({rec['fd'] / d['fd']:.2f}x)" if d else ""
                cells.append(f"{rec['leakage']:.2f} / {rec['forget_valid']:.2f} / {rec['retention']:.2f} / "
                             f"{rec['fd']:.1f}{ratio}")
                if row != "distill" and d:
                    ok.append(meets(rec, d))
            goal = "-" if row == "distill" or len(ok) < len(seeds) else ("**yes**" if all(ok) else "no")
            md.append(f"| {row} | {overrides} | " + " | ".join(cells) + f" | {goal} |")
        md.append("")
    md += ["![levers](levers.png)", ""]
    (out / "levers.md").write_text("\n".join(md))
    plot(records, distill, concepts, rows, out / "levers.png")
    return out / "levers.md"


def plot(records, distill, concepts, rows, path: Path) -> None:
    """Leakage against fd / distill fd, one panel per concept, one marker per (lever, seed); hollow markers: forget
    valid < 0.9."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(concepts), figsize=(5.5 * len(concepts), 4.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, concept in zip(axes[0], concepts):
        for i, row in enumerate(rows):
            pts = [(r["fd"] / distill[concept, r["seed"]]["fd"], r["leakage"], r["forget_valid"] >= 0.9)
                   for r in records if r["concept"] == concept and r["row"] == row and (concept, r["seed"]) in distill]
            for j, (x, y, drawn) in enumerate(pts):  # hollow: forget valid < 0.9 (objects erased, not suppressed)
                ax.scatter([x], [y], s=36, label=row if j == 0 else None, edgecolors=colours(i % 10),
                           facecolors=colours(i % 10) if drawn else "none")
        d_leak = [r["leakage"] for (c, _), r in distill.items() if c == concept]
        if d_leak:
            ax.scatter([1.0] * len(d_leak), d_leak, color="black", marker="x", label="distill")
        ax.axhline(0.1, color="grey", ls=":", lw=1)
        ax.axvline(1.1, color="grey", ls=":", lw=1)
        ax.set_xlabel("fd / distill fd (same seed)")
        ax.set_ylabel("leakage")
        ax.set_title(concept)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/levers")
    parser.add_argument("--concepts", nargs="+", default=["style:striped", "style:checkered"])
    parser.add_argument("--seeds", default="1000,1001", help="comma-separated DEVELOPMENT seeds (>= 1000)")
    parser.add_argument("--heldout", action="store_true",
                        help="REPORT levers already chosen on development seeds: the demo's seeds (< 1000) and prompts")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"subset of {','.join(LEVERS)} (in run order)")
    parser.add_argument("--lever", action="append", default=[], help="NAME=section.field=value,... (a combination)")
    parser.add_argument("--report-only", action="store_true", help="rewrite levers.md / levers.png from the jsonl")
    parser.add_argument("--targets", action="store_true",
                        help="only the target diagnostic (target_content) per concept, into OUT/targets.json")
    parser.add_argument("--tiny", action="store_true", help="tiny budgets: a test of the script, not a measurement")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return leak_atlas.exit_code(lambda: print(f"wrote {write_report(out)}"))
    if args.targets:
        def targets() -> None:
            found = {c: target_content(out / "student", c, tiny=args.tiny) for c in args.concepts}
            (out / "targets.json").write_text(json.dumps(found, indent=1))
            print(json.dumps(found, indent=1))
        return leak_atlas.exit_code(targets)

    def body() -> None:
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.heldout:
            check(all(0 <= s < 1000 for s in seeds), "--heldout --seeds: the demo's held-out seeds are 0-999 (e.g. 0,1,2)")
        else:
            check(all(s >= 1000 for s in seeds), "--seeds: development seeds are >= 1000 (0-2 are the held-out ones)")
        mixed = [r for r in leak_atlas.read_records(out / "levers.jsonl") if bool(r.get("heldout")) != args.heldout]
        check(not mixed, f"{out / 'levers.jsonl'} holds {'development' if args.heldout else 'held-out'} runs; give "
                         "development and held-out runs separate --out folders")
        names = [n.strip() for n in args.levers.split(",") if n.strip()]
        unknown = [n for n in names if n not in LEVERS]
        check(not unknown, f"--levers: unknown {unknown}; choose from {', '.join(LEVERS)} or add --lever NAME=...")
        levers = {n: LEVERS[n] for n in names} | dict(map(parse_lever, args.lever))
        for concept in args.concepts:
            for overrides in levers.values():  # a bad override fails now, not after an hour of runs
                leak_atlas.build_config(concept, "channels", [*BASE, *overrides], args.tiny)
        out.mkdir(parents=True, exist_ok=True)
        run(out, args.concepts, seeds, levers, args.tiny, args.heldout)
        print(f"wrote {write_report(out)}")

    return leak_atlas.exit_code(body)

if __name__ == "__main__":
    sys.exit(main())
