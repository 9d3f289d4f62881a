"""The leak atlas: the demo's protocol with every toy concept as the forbidden one, and what explains a leak.

For each pruning method (`--pruning`; one pruned student each, shared by every concept: pruning calibrates on the
pretrain split, which shows every concept) and each concept - every style, then every shape, then every colour,
then a few pairs suppressed in one run, so a partial atlas is already useful - it evaluates the teacher and the
pruned student once and fine-tunes `denoise_only`, `distill` and `bilevel` at each seed, with the functions and the
settings of `safeprune demo` (safeprune.recipes.demo: `shared_row`, `finetune_row`; trailing `section.field=value`
overrides apply to every run). Its evaluation is the demo's (same prompts, judge and `eval.*`) restricted to the
metrics the atlas tabulates (valid, leakage, retention, adherence, fd); resurgence and the curves are off.

Anchors (what the model should draw instead of a shape or colour): the toy world's own rule, the same for every
kind of concept (safeprune.unlearning.concepts.anchor_from_labels): the concept prompt without its forbidden words,
"a striped red" for "a striped red circle" when `circle` is forbidden, "a striped circle" when `red` is. The
fine-tuning data pair such a caption with every allowed value of the missing attribute, so the anchor is "the same
scene with any allowed shape / colour", the distribution the rendered anchor images of `ablation` draw from
(safeprune.unlearning.anchors). No per-kind choice is tuned: one rule, as for styles.

Diagnostics per concept (the columns that may explain a leak; the findings are written from the numbers):
  teacher / pruned leakage   was there a concept to copy, and did pruning already remove it?
  denoise_only vs distill    is it the KD terms that carry the concept (the data never show it)?
  pixel_delta                mean |image with the concept - the same scene (same jitter) with an allowed value
                             instead| / 255 over toy concept images: how much of the picture the concept is;
  judge_acc                  the judge's accuracy on real renderer images of the concept (can it be measured?).
atlas.md gives Spearman's rho between each diagnostic and distill's leakage over the concepts.

Resumable: one JSON line per (pruning, concept, seed, row) is appended to OUT/atlas.jsonl as each finishes
(rows shared by seeds have seed null, the teacher and the diagnostics also pruning null); a rerun skips what is
there. OUT/atlas.md and OUT/atlas.png are rewritten after every concept and regenerate from the jsonl alone
(`--report-only`). Skipped concepts (none today: every single concept and pair leaves each kind a value) are listed
in atlas.md with the reason.

    OMP_NUM_THREADS=2 python benchmarks/leak_atlas.py --out runs/leak_atlas --pruning channels blocks magnitude
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from safeprune.config import load_config
from safeprune.data.toyworld import COLOURS, SHAPES, STYLES
from safeprune.errors import UserError, check

KINDS = {"style": STYLES, "shape": SHAPES, "colour": tuple(COLOURS)}
FORBIDDEN_KEYS = {"style": "forbidden_styles", "shape": "forbidden_shapes", "colour": "forbidden_colours"}
# A few concepts suppressed in one run: two styles; a style and a shape; a shape and a colour.
PAIRS = ("style:striped+style:checkered", "style:striped+shape:cross", "shape:square+colour:green")
ROWS = ("teacher", "pruned", "denoise_only", "distill", "bilevel")  # the atlas's rows, in table order
TRAINED = ("distill", "denoise_only", "bilevel")  # fine-tuned per seed, in run order
METRICS = ("valid", "leakage", "forget_valid", "retention", "adherence", "fd")
# The atlas's own defaults under the demo's: the metrics it tabulates only, no resurgence (not tabulated).
BASE_OVERRIDES = ("eval.metrics=[valid,leakage,retention,adherence,fd]", "eval.resurgence_steps=0")
# --tiny: seconds per run, for tests (the numbers mean nothing)
TINY = ("finetune.max_steps=2", "finetune.batch_size=2", "finetune.upper.batch_size=2", "finetune.data.pool=4",
        "finetune.data.concept_pool=2", "finetune.upper.every=1", "finetune.warmup_steps=1",
        "finetune.ckpt_every_steps=2", "eval.seeds_per_prompt=1", "eval.max_prompts=2", "eval.real_per_image=1",
        "eval.heldout=false", "sample.steps=2", "prune.ratio=0.3")
DIAGNOSTIC_IMAGES = 64  # toy concept images behind pixel_delta and judge_acc


def all_concepts() -> list[str]:
    """Every single concept (styles, shapes, colours, in that order), then PAIRS."""
    return [f"{kind}:{name}" for kind, names in KINDS.items() for name in names] + list(PAIRS)


def parse_concept(concept: str) -> list[tuple[str, str]]:
    """'style:striped+shape:cross' -> [("style", "striped"), ("shape", "cross")]."""
    parts = []
    for part in concept.split("+"):
        kind, _, name = part.partition(":")
        check(kind in KINDS and name in KINDS[kind],
              f"--concepts: {concept!r} is not a toy concept; write KIND:NAME (KIND: {', '.join(KINDS)}; e.g. "
              f"style:striped, shape:circle, colour:red), joined with + for several in one run")
        parts.append((kind, name))
    return parts


def concept_overrides(concept: str) -> list[str]:
    """The toyworld.forbidden_* overrides that make `concept` the forbidden one (and nothing else)."""
    parts = parse_concept(concept)
    return [f"toyworld.{key}=[{', '.join(n for k, n in parts if k == kind)}]" for kind, key in FORBIDDEN_KEYS.items()]


def why_skip(world) -> str | None:
    """Why the toy world cannot run this concept's protocol, or None."""
    for name in ("forget", "retain"):
        if not world.prompts(name):
            return f"no {name} prompts"
    return None


# ----------------------------------------------------------------------------- the jsonl


def read_records(path: Path) -> list[dict]:
    """The atlas's lines; a line torn by a kill is skipped (its work is redone)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "row" in rec:
            records.append(rec)
    return records


def append_record(path: Path, record: dict) -> None:
    """One line, written with one call and flushed to disk; a torn last line is closed first."""
    text = json.dumps(record) + "\n"
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        text = "\n" + text
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def key(rec: dict) -> tuple:
    return rec["pruning"], rec["concept"], rec["seed"], rec["row"]


# ----------------------------------------------------------------------------- diagnostics


def diagnostics(world, judge, n: int = DIAGNOSTIC_IMAGES) -> dict:
    """pixel_delta and judge_acc of the world's forbidden concept(s) (see the module doc)."""
    from safeprune.data.toyworld import draw
    from safeprune.unlearning.anchors import anchor_labels
    from safeprune.utils import numpy_rng

    concepts = world.forbidden_concepts
    size, deltas, images, hits = world.cfg.size, [], [], []
    for i in range(n):
        image, _, labels = world.sample("concept", i)
        other = anchor_labels(labels, world.forbidden, world.allowed, numpy_rng(world.seed, "atlas-anchor", i))
        # the same scene: both drawn with one jitter stream (draw takes the same draws whatever the labels)
        a, b = (draw(lb, np.random.default_rng([world.seed, 99, i]), size).astype(np.float32) for lb in (labels, other))
        deltas.append(np.abs(a - b).mean() / 255)
        images.append(image)
    judged = judge.predict(np.stack(images))
    for i in range(n):
        kind, name = concepts[i % len(concepts)]  # the concept split deals its concepts round-robin
        hits.append(judged[kind][i] == name)
    return {"pixel_delta": float(np.mean(deltas)), "judge_acc": float(np.mean(hits))}


# ----------------------------------------------------------------------------- the runs


def build_config(concept: str, pruning: str, overrides: list[str], tiny: bool):
    return load_config(None, [*BASE_OVERRIDES, *(TINY if tiny else ()), *overrides, f"prune.method={pruning}",
                              *concept_overrides(concept)])


def run_atlas(out: Path, prunings: list[str], concepts: list[str], seeds: list[int], overrides: list[str],
              tiny: bool) -> None:
    from tqdm import tqdm

    from safeprune.data.toyworld import ToyWorld
    from safeprune.eval.judge import load_judge
    from safeprune.models.io import load_pipeline
    from safeprune.models.shipped import load_teacher
    from safeprune.recipes import demo

    jsonl = out / "atlas.jsonl"
    done = {key(r) for r in read_records(jsonl)}

    def needed(pruning, concept):
        if (None, concept, None, "skipped") in done:
            return []
        return [k for k in ([(None, concept, None, "diagnostics"), (None, concept, None, "teacher"),
                             (pruning, concept, None, "pruned")]
                            + [(pruning, concept, s, r) for s in seeds for r in TRAINED]) if k not in done]

    units = [(p, c) for p in prunings for c in concepts]
    todo = [u for u in units if needed(*u)]
    judge, teacher = load_judge(), load_teacher()
    bar = tqdm(todo, desc="leak atlas", unit="concept", initial=len(units) - len(todo), total=len(units))
    for pruning, concept in bar:
        bar.set_postfix_str(f"{pruning} {concept}")
        cfg = build_config(concept, pruning, overrides, tiny)
        world = ToyWorld(cfg.toyworld, seed=cfg.seed)
        reason = why_skip(world)
        if reason:
            append_record(jsonl, {"pruning": None, "concept": concept, "seed": None, "row": "skipped", "why": reason})
            continue
        student, timings = out / pruning / "student", {}
        if not (student / "prune_report.json").is_file():
            shutil.rmtree(student, ignore_errors=True)  # a prune this script started and did not finish
            demo.prune_once(build_config(concepts[0], pruning, overrides, tiny), student, timings)
        prune_report = json.loads((student / "prune_report.json").read_text())

        def record(row, metrics, seed=None, shared_by_pruning=False):
            rec = {"pruning": None if shared_by_pruning else pruning, "concept": concept, "seed": seed, "row": row,
                   **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
            append_record(jsonl, rec)
            done.add(key(rec))

        todo_keys = needed(pruning, concept)
        for k in todo_keys:
            _, _, seed, row = k
            t = time.perf_counter()
            if row == "diagnostics":
                record(row, diagnostics(world, judge), shared_by_pruning=True)
            elif row == "teacher":
                record(row, demo.shared_row("teacher", teacher, cfg, world, judge, teacher, prune_report, {})
                       | {"eval_s": time.perf_counter() - t}, shared_by_pruning=True)
            elif row == "pruned":
                record(row, demo.shared_row("pruned", load_pipeline(student), cfg, world, judge, teacher,
                                            prune_report, {}) | {"eval_s": time.perf_counter() - t})
            else:
                run_dir = out / pruning / concept / f"seed{seed}" / row
                shutil.rmtree(run_dir, ignore_errors=True)  # a run this script started and did not record
                metrics, _, _ = demo.finetune_row(cfg, row, seed, student, run_dir, world, judge, None, None, {},
                                                  prune_report, timings)
                record(row, metrics | {"wall_s": time.perf_counter() - t}, seed=seed)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the saved model stays; disk stays small
        write_report(out)


# ----------------------------------------------------------------------------- the report


def collect(records: list[dict]) -> dict:
    """{pruning: {concept: {row: mean metrics over seeds}}}, teacher and diagnostics copied into every pruning."""
    shared: dict = {}
    grouped: dict = {}
    for rec in records:
        if rec["row"] in ("teacher", "diagnostics", "skipped"):
            shared.setdefault(rec["concept"], {})[rec["row"]] = [rec]
        else:
            grouped.setdefault(rec["pruning"], {}).setdefault(rec["concept"], {}).setdefault(rec["row"], []).append(rec)
    out: dict = {}
    for pruning, by_concept in grouped.items():
        for concept, by_row in by_concept.items():
            rows = {r: recs for r, recs in {**shared.get(concept, {}), **by_row}.items() if r != "skipped"}
            out.setdefault(pruning, {})[concept] = {
                r: {k: float(np.mean([x[k] for x in recs if k in x])) for k in recs[0]
                    if isinstance(recs[0][k], (int, float)) and k != "seed"} | {"n": len(recs)}
                for r, recs in rows.items()}
    return out


def _order(concepts) -> list[str]:
    catalogue = all_concepts()
    return sorted(concepts, key=lambda c: catalogue.index(c) if c in catalogue else len(catalogue))


def _fmt(row: dict | None, k: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(row[k]) if row and k in row else "-"


def _verdict(rows: dict) -> tuple[str, str]:
    """(do pruned / denoise_only / distill leak, bilevel's conditional check) by the demo's own rules
    (safeprune.recipes.demo)."""
    from safeprune.recipes.demo import judge_claims, leaks

    if not all(r in rows for r in ("teacher", "distill", "bilevel")):
        return "-", "-"
    checks, _ = judge_claims({r: rows[r] for r in ROWS if r in rows})
    failed = [k for k, v in checks.items() if not v and k != "students_recovered"]
    label = "suppresses" if "bilevel_suppresses" in checks else "no harm"
    found = " / ".join(("yes" if leaks(rows[r], rows["teacher"]) else "no") if r in rows else "-"
                       for r in ("pruned", "denoise_only", "distill"))
    return found, f"{label}: " + ("met" if not failed else "missed " + ", ".join(failed))


DIAGNOSTICS = (("teacher", "leakage"), ("pruned", "leakage"), ("denoise_only", "leakage"),
               ("diagnostics", "pixel_delta"), ("diagnostics", "judge_acc"))


def correlations(by_concept: dict) -> str:
    """Spearman's rho of each diagnostic with distill's leakage over the concepts that have both."""
    from scipy.stats import spearmanr

    parts = []
    for row, k in DIAGNOSTICS:
        pairs = [(rows[row][k], rows["distill"]["leakage"]) for rows in by_concept.values()
                 if row in rows and k in rows[row] and "distill" in rows]
        x, y = zip(*pairs) if pairs else ((), ())
        if len(pairs) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
            parts.append(f"{row}.{k} n/a (n={len(pairs)})")
        else:
            parts.append(f"{row}.{k} {spearmanr(x, y).statistic:+.2f} (n={len(pairs)})")
    return "Spearman rho with distill leakage: " + "; ".join(parts)


def write_report(out: Path) -> Path:
    """OUT/atlas.md and OUT/atlas.png from OUT/atlas.jsonl alone."""
    records = read_records(out / "atlas.jsonl")
    check(bool(records), f"{out / 'atlas.jsonl'} has no results yet; run the atlas first")
    data = collect(records)
    md = ["# Leak atlas", "", f"{len(records)} records in atlas.jsonl; rows: {', '.join(ROWS)} (mean over seeds). "
          "Leakage: share of forget-prompt images judged to show the forbidden concept; fd ratio: bilevel fd / "
          "distill fd; leaks / bilevel check: the demo's rules (safeprune.recipes.demo.judge_claims).", ""]
    skipped = [r for r in records if r["row"] == "skipped"]
    md += [f"- skipped {r['concept']}: {r['why']}" for r in skipped] + ([""] if skipped else [])
    for pruning in sorted(data):
        by_concept = {c: data[pruning][c] for c in _order(data[pruning])}
        md += [f"## pruning: {pruning}", "",
               "| concept | teacher | pruned | denoise_only | distill | bilevel | bilevel forget valid | retention "
               "distill / bilevel | fd distill / bilevel (ratio) | pixel delta | judge acc | seeds | leaks: pruned / "
               "denoise_only / distill | bilevel check |", "|---|" + "---|" * 13]
        for concept, rows in by_concept.items():
            d, b = rows.get("distill"), rows.get("bilevel")
            ratio = f" ({b['fd'] / d['fd']:.2f}x)" if d and b and d.get("fd") else ""
            finding, verdict = _verdict(rows)
            md.append(f"| {concept} | " + " | ".join(_fmt(rows.get(r), "leakage") for r in ROWS) + " | "
                      + f"{_fmt(b, 'forget_valid')} | {_fmt(d, 'retention')} / {_fmt(b, 'retention')} | "
                      + f"{_fmt(d, 'fd', '{:.1f}')} / {_fmt(b, 'fd', '{:.1f}')}{ratio} | "
                      + f"{_fmt(rows.get('diagnostics'), 'pixel_delta', '{:.3f}')} | "
                      + f"{_fmt(rows.get('diagnostics'), 'judge_acc')} | {_fmt(d, 'n', '{:.0f}')} | {finding} | "
                      + f"{verdict} |")
        seconds = sum(r.get("wall_s", 0) + r.get("eval_s", 0) for r in records if r["pruning"] == pruning)
        md += ["", f"- {correlations(by_concept)}",
               f"- cost: {seconds / 60:.1f} min of runs for {len(by_concept)} concepts ({seconds / len(by_concept):.0f} s "
               "per concept, the shared teacher and diagnostics not counted)", ""]
    md += ["## Findings", "", "(written from the numbers above)", "", "![atlas](atlas.png)"]
    (out / "atlas.md").write_text("\n".join(md) + "\n")
    plot_atlas(data, out / "atlas.png")
    return out / "atlas.md"


def plot_atlas(data: dict, path: Path) -> None:
    """Per pruning method: leakage heatmap (concepts x ROWS) and fd / distill's fd (concepts x students)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_rows = ("pruned", "denoise_only", "bilevel")
    prunings = sorted(data)
    if not prunings:  # only shared rows so far (teacher, diagnostics): nothing to compare yet
        return
    n = max(len(data[p]) for p in prunings)
    fig, axes = plt.subplots(len(prunings), 2, figsize=(11, 1.2 + 0.35 * n * len(prunings) + 0.8 * len(prunings)),
                             squeeze=False)
    for (ax_leak, ax_fd), pruning in zip(axes, prunings):
        concepts = _order(data[pruning])
        leak = np.array([[data[pruning][c].get(r, {}).get("leakage", np.nan) for r in ROWS] for c in concepts])
        fd = np.array([[data[pruning][c].get(r, {}).get("fd", np.nan) / data[pruning][c]["distill"]["fd"]
                        if "distill" in data[pruning][c] else np.nan for r in ratio_rows] for c in concepts])
        for ax, values, cols, title, cmap, vmax in (
                (ax_leak, leak, ROWS, f"{pruning}: leakage", "Reds", 1.0),
                (ax_fd, fd, ratio_rows, f"{pruning}: fd / distill's fd", "coolwarm", None)):
            finite = values[np.isfinite(values)]
            if vmax is None:  # centred on 1 (distill's quality)
                spread = max(1e-3, float(np.max(np.abs(finite - 1)))) if finite.size else 1.0
                im = ax.imshow(values, cmap=cmap, vmin=1 - spread, vmax=1 + spread, aspect="auto")
            else:
                im = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v):
                    dark = vmax is not None and v > 0.6  # white on the dark end of the leakage scale
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
            ax.set_xticks(range(len(cols)), cols, rotation=20, fontsize=8)
            ax.set_yticks(range(len(concepts)), concepts, fontsize=8)
            ax.set_title(title)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command


def exit_code(body) -> int:
    """Run `body()`; a UserError becomes its one-line message on stderr and exit code 2 (the CLI's convention)."""
    try:
        body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from safeprune.pruning import METHODS as PRUNING

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="section.field=value, applied to every run")
    parser.add_argument("--out", default="runs/leak_atlas", help="folder: atlas.jsonl, atlas.md, atlas.png, runs")
    parser.add_argument("--pruning", nargs="+", default=["channels", "blocks", "magnitude"],
                        help="pruning methods (safeprune.pruning), one pruned student each")
    parser.add_argument("--concepts", nargs="+", default=None,
                        help="KIND:NAME[+KIND:NAME] (default: every style, shape, colour, then the pairs)")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds")
    parser.add_argument("--tiny", action="store_true", help="seconds per run (tests; the numbers mean nothing)")
    parser.add_argument("--report-only", action="store_true", help="rewrite atlas.md / atlas.png from atlas.jsonl")
    args = parser.parse_args(argv)
    out = Path(args.out)

    def body() -> None:
        if args.report_only:
            print(f"wrote {write_report(out)}")
            return
        for p in args.pruning:
            check(p in PRUNING and p != "none", f"--pruning {p!r}; choose from: "
                                                f"{', '.join(m for m in PRUNING if m != 'none')}")
        concepts = args.concepts or all_concepts()
        for c in concepts:
            parse_concept(c)
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: write comma-separated integers, e.g. 0 or 0,1,2") from None
        cfg = build_config(concepts[0], args.pruning[0], args.overrides, args.tiny)  # a bad override fails now
        # bilevel's rows also take the demo's per-method overrides, whose defaults change with the package
        settings = {"overrides": args.overrides, "tiny": args.tiny, "bilevel": cfg.demo.overrides.get("bilevel", [])}
        out.mkdir(parents=True, exist_ok=True)
        settings_file = out / "atlas_settings.json"
        if settings_file.is_file():  # results of other settings must not mix into one table
            check(json.loads(settings_file.read_text()) == settings,
                  f"{out} holds an atlas run with other settings ({settings_file.read_text().strip()}); pass the "
                  "same overrides / --tiny to resume it, or another --out")
        else:
            settings_file.write_text(json.dumps(settings))
        run_atlas(out, args.pruning, concepts, seeds, args.overrides, args.tiny)
        print(f"wrote {write_report(out)}")

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
