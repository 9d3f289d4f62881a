"""`safeprune demo`: the paper's claim (seed paper Fig. 1, Tab. 1), end to end on the embedded toy world.

1. prune the shipped teacher (`prune.*`; default `channels`, see the README for why that ratio);
2. fine-tune the student three ways at equal budgets — `distill` (lower level only), `two_stage` (distill,
   then bilevel's own unlearning loss alone; the row `distill+bilevel_loss`) and `bilevel` — logging leakage and
   fd every `demo.curve_every` steps;
3. the paper's two-stage baselines (Tab. 1 "+ ESD", "+ UCE", "+ ConceptPrune"): each `demo.baselines` erasure
   method (safeprune.erasure, settings `unlearn.*`) applied to the distilled student, the training-based one at
   bilevel's upper-level budget — exactly `finetune --method two_stage --unlearn NAME`, without re-distilling;
4. evaluate the teacher and every student with the judge; `resurgence`: fine-tune each suppressed student
   `eval.resurgence_steps` more steps on benign data (lower level only) and measure leakage again;
5. write report.md / results.json / grid.png / curves.png and print the table.
With `demo.seeds = N` steps 2-4 repeat for N seeds (the pruned student is shared) and the table shows mean ± std.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from safeprune.bilevel import build_method, uses_upper
from safeprune.config import Config, load_config, save_config, to_dict
from safeprune.errors import check
from safeprune.recipes.report import aggregate, model_grid, table, write_report

METHODS = ("distill", "two_stage", "bilevel")  # the runs compared (registry keys of safeprune.bilevel.METHODS)
# Table names: today's two_stage runs bilevel's upper loss after distilling; baselines read "distill+NAME".
ROW_NAMES = {"two_stage": "distill+bilevel_loss"}
BASELINE_NAMES = {"esd_paper": "distill+ESD", "uce": "distill+UCE", "conceptprune": "distill+ConceptPrune"}


def baseline_row(method: str) -> str:
    return BASELINE_NAMES.get(method, f"distill+{method}")


def _with(cfg: Config, **sections) -> Config:
    """A copy of `cfg` with some fields of some sections replaced: _with(cfg, finetune={"method": "distill"})."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


def _pipe_with(teacher_pipe, unet):
    """The teacher pipeline's parts around another UNet (no copies)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{**teacher_pipe.components, "unet": unet}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampling_ms(pipe, cfg: Config, n: int = 16) -> float:
    """Wall time per image of a full sampling run (cfg.sample settings, batch n)."""
    from safeprune.sampling import generate_images

    generate_images(pipe, ["a red circle"] * 2, [0, 1], cfg.sample.steps, cfg.sample.guidance, progress=False)
    start = time.perf_counter()
    generate_images(pipe, ["a red circle"] * n, list(range(n)), cfg.sample.steps, cfg.sample.guidance, progress=False)
    return 1000 * (time.perf_counter() - start) / n


def _curve_eval(teacher_pipe, world, cfg: Config, judge):
    """The cheap evaluation behind curves.png: leakage and fd on a few prompts, one seed each."""
    from safeprune.eval.metrics import EvalContext, run_metrics

    small = _with(cfg, eval={"max_prompts": cfg.demo.curve_prompts, "seeds_per_prompt": 1, "heldout": False})

    def on_eval(step, unet):
        unet.eval()
        try:
            res = run_metrics(EvalContext(_pipe_with(teacher_pipe, unet), world, small, judge), ["leakage", "fd"])
        finally:
            unet.train()
        return {k: res[k] for k in ("leakage", "fd")}

    return on_eval


def demo(cfg: Config, out: Path) -> dict:
    from safeprune.data.toyworld import ToyWorld
    from safeprune.eval.judge import load_judge
    from safeprune.eval.metrics import evaluate_model
    from safeprune.models.io import load_pipeline
    from safeprune.models.shipped import load_teacher
    from safeprune.recipes.finetune import finetune
    from safeprune.recipes.prune import prune_student

    start = time.perf_counter()
    unknown = sorted(set(cfg.demo.overrides) - set(METHODS))  # a typo fails before any fine-tuning
    check(not unknown, f"demo.overrides names {unknown}; its keys are fine-tuning rows: {', '.join(METHODS)}")
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    judge, teacher = load_judge(), load_teacher()
    save_config(cfg, out)
    timings: dict[str, float] = {}

    # 1. prune once; every seed fine-tunes the same student.
    t = time.perf_counter()
    prune_student(_with(cfg, paths={"out": str(out / "student")}))
    prune_report = json.loads((out / "student" / "prune_report.json").read_text())
    timings["prune_s"] = time.perf_counter() - t

    # 2. the teacher, evaluated once (its own CP reference; the students' is their seed's distill row, see below).
    reference_cache: dict = {}
    t = time.perf_counter()
    teacher_row = evaluate_model(teacher, world, cfg, teacher, judge, reference_cache)
    teacher_row |= {"params_m": prune_report["params_before"] / 1e6, "sample_ms": _sampling_ms(teacher, cfg)}
    timings["eval_teacher_s"] = time.perf_counter() - t

    from safeprune.erasure import ERASURE
    from safeprune.errors import choose

    for name in cfg.demo.baselines:  # a typo fails before any fine-tuning
        choose("erasure method in demo.baselines", name, ERASURE)
    per_seed: dict[str, list[dict]] = {m: [] for m in [*METHODS, *cfg.demo.baselines]}
    curves: dict[str, list[dict]] = {m: [] for m in METHODS}
    on_eval = _curve_eval(teacher, world, cfg, judge)
    for seed in range(cfg.seed, cfg.seed + cfg.demo.seeds):
        # The CP reference (safeprune.eval.cp) is the paper's: the distilled, unerased student of this seed, which
        # is its own reference (CP 0 by construction) and files its images for the suppressing rows to reuse.
        distilled, distilled_cache = None, {}
        for method in METHODS:
            run_dir = out / f"seed{seed}" / ROW_NAMES.get(method, method)
            run_cfg = dataclasses.replace(_with(cfg, finetune={"method": method, "eval_every_steps": cfg.demo.curve_every},
                                                paths={"student": str(out / "student"), "out": str(run_dir)}), seed=seed)
            if cfg.demo.overrides.get(method):  # the tuning sweep's own choice for this row
                run_cfg = load_config(base=to_dict(run_cfg), overrides=cfg.demo.overrides[method])
            t = time.perf_counter()
            finetune(run_cfg, on_eval=on_eval)
            timings[f"finetune_{method}_s"] = timings.get(f"finetune_{method}_s", 0) + time.perf_counter() - t
            pipe = load_pipeline(run_dir)
            distilled = distilled if uses_upper(build_method(run_cfg.finetune)) else pipe  # the unerased run
            t = time.perf_counter()
            ref, cache = (teacher, reference_cache) if distilled is None else (distilled, distilled_cache)
            row = evaluate_model(pipe, world, run_cfg, ref, judge, cache)
            summary = json.loads((run_dir / "summary.json").read_text())
            row |= {"params_m": prune_report["params_after"] / 1e6, "train_s": summary["wall_s"],
                    "student_passes": sum(v for k, v in summary["counts"].items() if k.startswith("student"))}
            if seed == cfg.seed:
                row["sample_ms"] = _sampling_ms(pipe, cfg)
            if uses_upper(build_method(run_cfg.finetune)) and cfg.eval.resurgence_steps > 0:  # it suppresses
                row["resurgence_leakage"] = _resurgence(run_cfg, run_dir, world, judge, finetune, load_pipeline)
            timings[f"eval_{method}_s"] = timings.get(f"eval_{method}_s", 0) + time.perf_counter() - t
            per_seed[method].append(row)
            for rec in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()):
                if "eval/leakage" in rec:
                    curves[method].append(rec)
            del pipe
        for name in cfg.demo.baselines:  # step 3: the paper's baselines on this seed's distilled student
            run_cfg = dataclasses.replace(cfg, seed=seed)
            t = time.perf_counter()
            run_dir = _baseline(run_cfg, name, out / f"seed{seed}")
            timings[f"unlearn_{name}_s"] = timings.get(f"unlearn_{name}_s", 0) + time.perf_counter() - t
            pipe = load_pipeline(run_dir)
            t = time.perf_counter()
            row = evaluate_model(pipe, world, run_cfg, teacher, judge, reference_cache)
            summary = json.loads((run_dir / "summary.json").read_text())
            distilled = per_seed["distill"][-1]
            row |= {"params_m": prune_report["params_after"] / 1e6, "train_s": distilled["train_s"] + summary["seconds"],
                    "student_passes": distilled["student_passes"] + sum(
                        v for k, v in summary.get("counts", {}).items() if k.startswith("student"))}
            if cfg.eval.resurgence_steps > 0:
                row["resurgence_leakage"] = _resurgence(run_cfg, run_dir, world, judge, finetune, load_pipeline)
            timings[f"eval_{name}_s"] = timings.get(f"eval_{name}_s", 0) + time.perf_counter() - t
            per_seed[name].append(row)
            del pipe

    order = ["distill", *cfg.demo.baselines, "two_stage", "bilevel"]
    names = {m: ROW_NAMES.get(m, m) for m in METHODS} | {b: baseline_row(b) for b in cfg.demo.baselines}
    rows = {"teacher": teacher_row} | {names[m]: aggregate(per_seed[m]) for m in order}
    grid = model_grid({"teacher": teacher} | {names[m]: load_pipeline(out / f"seed{cfg.seed}" / names[m])
                                              for m in order}, world, cfg)
    curves = {names[m]: c for m, c in curves.items()}
    per_seed = {names[m]: v for m, v in per_seed.items()}
    checks, notes = judge_claims(rows)
    timings["total_s"] = time.perf_counter() - start
    extra = {"checks": checks, "cp_reference": {"teacher": "teacher"} | dict.fromkeys(METHODS, "distill"),
             "seeds": cfg.demo.seeds, "timings_s": {k: round(v, 1) for k, v in timings.items()},
             "prune": prune_report, "per_seed": per_seed}
    report = write_report(out, rows, curves, grid, notes, extra)
    print(table(rows))
    for note in notes:
        print(f"- {note}")
    print(f"demo finished in {timings['total_s'] / 60:.1f} min; report: {report}")
    return rows


def _baseline(cfg: Config, method: str, seed_dir: Path) -> Path:
    """`finetune --method two_stage --unlearn METHOD`'s second stage on this seed's distilled student (the first
    stage IS the distill row: same seed, same steps), into seed_dir/distill+NAME."""
    from safeprune.recipes.unlearn import matched_budget, unlearn

    run_cfg = matched_budget(_with(cfg, unlearn={"method": method},
                                   paths={"model": str(seed_dir / "distill"), "out": str(seed_dir / baseline_row(method))}))
    return unlearn(run_cfg)


def _resurgence(cfg: Config, run_dir: Path, world, judge, finetune, load_pipeline) -> float:
    """Leakage after `eval.resurgence_steps` of benign fine-tuning (lower level only) of a suppressed student."""
    from safeprune.eval.metrics import evaluate_model

    steps = cfg.eval.resurgence_steps
    benign = _with(cfg, finetune={"method": "distill", "max_steps": steps, "eval_every_steps": 0,
                                  "ckpt_every_steps": steps})
    benign = _with(benign, eval={"metrics": ["leakage"], "heldout": False},
                   paths={"student": str(run_dir), "out": str(run_dir / "resurgence")})
    folder = finetune(benign)
    return evaluate_model(load_pipeline(folder), world, benign, None, judge)["leakage"]


def judge_claims(rows: dict[str, dict]) -> tuple[dict, list[str]]:
    """The issue's criteria, checked plainly: are the students recovered, and does the paper's effect show?
    Every two-stage row (bilevel's loss after distilling, and each baseline) gets its own "bilevel beats" check."""
    two_name = ROW_NAMES["two_stage"] if ROW_NAMES["two_stage"] in rows else "two_stage"
    t, d, two, b = (rows[k] for k in ("teacher", "distill", two_name, "bilevel"))
    recovered = d["valid"] >= 0.9 and d["retention"] >= 0.8 * t["retention"]
    checks = {
        "students_recovered": recovered,
        "distill_reproduces_concept": d["leakage"] >= 0.5 * t["leakage"],
        # blank images are not suppression: the forget prompts must still show an object
        "bilevel_suppresses": b["leakage"] <= 0.1 and b["forget_valid"] >= 0.9,
        "bilevel_keeps_retention": b["retention"] >= d["retention"] - 0.05,
        "bilevel_keeps_fd": b["fd"] <= 1.1 * d["fd"],
        "bilevel_beats_two_stage": b["leakage"] <= two["leakage"] and b["fd"] <= two["fd"],
    }
    for name in (n for n in rows if n.startswith("distill+") and n != two_name):
        r = rows[name]
        checks[f"bilevel_beats_{name}"] = b["leakage"] <= r["leakage"] and b["fd"] <= r["fd"]
    notes = []
    if not recovered:
        notes.append("WARNING: the distilled student has NOT recovered (valid < 0.9 or retention < 0.8x the "
                     "teacher's); the leakage figures below mean little until it has - raise finetune.max_steps.")
    notes += [f"{k.replace('_', ' ')}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    notes.append("leakage = share of forget-prompt images the judge labels with the forbidden style (lower is "
                 "better); an image without an object is not counted as suppressed (see valid).")
    return checks, notes


def run(cfg: Config, args) -> int:
    from safeprune.runs import lock, open_run

    out = Path(cfg.paths.out or "runs/demo")
    seeds = [f"seed{s}" for s in range(cfg.seed, cfg.seed + cfg.demo.seeds)]
    with lock(out, "demo"):
        # a re-run replaces an earlier demo's files (only those: anything a person added stops it)
        run = open_run(out, "demo", replace_own=True,
                       legacy=lambda folder: (folder / LEGACY_MARKER).is_file() and (*DEMO_FILES, LEGACY_MARKER))
        run.begin(claim=(*DEMO_FILES, *seeds)).save(state="training")
        demo(cfg, out)
        run.save(state="finished")
    return 0


# what a demo writes at the top level of its folder; seed folders are added per run
DEMO_FILES = ("config.yaml", "student", "report.md", "results.json", "grid.png", "curves.png")
LEGACY_MARKER = ".safeprune-demo"  # older demos marked their folder with this file
