"""`safeprune report RUN_DIR... --out DIR`: the tables, a Fig.-1-style grid and Fig.-4-style curves.

A run folder is anything with evaluation results: `results.json`, `eval/results.json` or `eval/*/results.json`
(one per protocol) as written by `safeprune evaluate`; the protocols' metrics merge into one row per folder, keys
prefixed with the protocol (`coco/fid`, `styles/cp_forget`; toy keys stay bare). When it is also a fine-tuning run,
its `metrics.jsonl` gives the curves and `summary.json` the training time. Rows of the paper's table (Sec. 5:
style CLIP, CP, CSD, COCO FID, COCO CLIP, NudeNet) run teacher, distill-only, each two-stage baseline
(`two_stage`, `distill+uce`, ...), bilevel. The demo calls `write_report` with the same structures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from safeprune.config import Config, save_config
from safeprune.errors import check
from safeprune.eval.protocols import in_toy_world
from safeprune.utils import atomic_folder, read_json, read_text

# (results key, column title, format); a missing key prints as "-".
COLUMNS = (
    ("valid", "valid", "{:.2f}"),
    ("leakage", "leakage", "{:.2f}"),
    ("retention", "retention", "{:.2f}"),
    ("adherence", "adherence", "{:.2f}"),
    ("fd", "fd", "{:.1f}"),
    ("heldout_leakage", "held-out leakage", "{:.2f}"),
    ("resurgence_leakage", "resurgence leakage", "{:.2f}"),
    ("concept_affinity", "concept affinity", "{:.3f}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("sample_ms", "sampling ms/img", "{:.1f}"),
    ("train_s", "train time (s)", "{:.0f}"),
)
# The paper's table (method.md Sec. 5): arrows say which way is better.
PAPER_COLUMNS = (
    ("styles/style_clip_forget", "style CLIP ↓", "{:.2f}"),
    ("styles/cp_forget", "CP ↑", "{:.1f}"),
    ("styles/csd_forget", "CSD ↓", "{:.2f}"),
    ("coco/fid", "COCO FID ↓", "{:.2f}"),
    ("coco/clip_score", "COCO CLIP ↑", "{:.2f}"),
    ("coco/cmmd", "COCO CMMD ↓", "{:.3f}"),
    ("styles/style_clip_retain", "retained style CLIP ↑", "{:.2f}"),
    ("nudity/nudenet_images", "NudeNet images ↓", "{:.0f}"),
    ("nudity/nudenet_vs_teacher", "NudeNet vs teacher (%)", "{:+.0f}"),
)
CURVES = (("eval/fd", "fd (judge space)"), ("eval/leakage", "leakage"))


def aggregate(runs: list[dict]) -> dict:
    """Mean of every numeric key over the runs (seeds) that have it, with `<key>_std` siblings where several do
    (the demo times sampling on the first seed only)."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in run.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, []).append(v)
    out = {k: float(np.mean(v)) for k, v in values.items()}
    out |= {f"{k}_std": float(np.std(v, ddof=1)) for k, v in values.items() if len(v) > 1}
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    std = row.get(f"{key}_std")
    return fmt.format(value) + (f" ± {fmt.format(std)}" if isinstance(std, float) else "")


def paper_order(names) -> list[str]:
    """teacher, the controls (pruned, denoise_only), distill-only, the two-stage baselines, bilevel, then anything
    else (each group in given order)."""
    def rank(name: str) -> float:
        n = name.lower()
        if "teacher" in n:
            return 0
        if n in ("pruned", "denoise_only"):
            return 0.5 if n == "pruned" else 0.75
        if "bilevel" in n:
            return 3
        if "+" in n or "two_stage" in n or "two-stage" in n:
            return 2
        if "distill" in n:
            return 1
        return 4
    return sorted(names, key=rank)


def table(rows: dict[str, dict], columns=COLUMNS) -> str:
    """A markdown table: one row per model, the `columns` that any model has."""
    cols = [c for c in columns if any(c[0] in r for r in rows.values())]
    lines = ["| model | " + " | ".join(title for _, title, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(_cell(r, key, fmt) for key, _, fmt in cols) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


RECOVERY = ("denoise_only", "distill")  # seed paper Fig. 4: fd against step without and with the KD terms


def _by_step(points: list[dict], key: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(steps, mean, std) of `key` over the runs (seeds) that logged it at each step; std 0 for a single run."""
    steps = sorted({p["step"] for p in points if key in p})
    values = [[p[key] for p in points if key in p and p["step"] == st] for st in steps]
    return steps, np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])


def plot_curves(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """fd and leakage against training step, one line per method (mean over seeds when they share steps). When the
    curves hold both RECOVERY rows, a first panel shows their fd alone, ± std over seeds: the recovery comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    recovery = all(curves.get(name) for name in RECOVERY)
    panels = ([("recovery", "recovery: fd (judge space), KD off vs on")] if recovery else []) + list(CURVES)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        if key == "recovery":
            for name in RECOVERY:
                steps, mean, std = _by_step(curves[name], "eval/fd")
                line, = ax.plot(steps, mean, marker="o", label=name)
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.legend()
        else:
            for i, (name, points) in enumerate(curves.items()):
                steps, mean, _ = _by_step(points, key)
                if steps:
                    # Earlier lines drawn wider: two_stage's first phase IS distill and would hide its line.
                    wide = len(curves) - 1 - i
                    ax.plot(steps, mean, marker="o", label=name, linewidth=1.5 + 1.5 * wide, markersize=5 + 2 * wide,
                            linestyle="--" if name in RECOVERY[:1] else "-")
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][1 if recovery else 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_grid(pipes: dict, world, cfg: Config, n_forget: int = 6, n_retain: int = 6, seed: int = 1234):
    """Fig. 1: rows = models, columns = forget then retain prompts, the same seed per column for every model."""
    from safeprune.sampling import generate_images
    from safeprune.viz import make_grid

    forget = world.prompts("forget")[:: max(1, len(world.prompts("forget")) // n_forget)][:n_forget]
    retain = world.prompts("retain")[:: max(1, len(world.prompts("retain")) // n_retain)][:n_retain]
    records = forget + retain
    prompts, seeds = [r["prompt"] for r in records], [seed + j for j in range(len(records))]
    rows = [list(generate_images(pipe, prompts, seeds, cfg.sample.steps, cfg.sample.guidance, progress=False))
            for pipe in pipes.values()]
    cols = [("F: " if r["forbidden"] else "") + f"{r['style']} {r['colour']} {r['shape']}" for r in records]
    return make_grid(rows, list(pipes), cols, scale=3)


def write_report(out: Path, rows: dict[str, dict], curves: dict[str, list[dict]], grid=None,
                 notes: list[str] = (), extra: dict | None = None, paper_table: bool = False) -> Path:
    """Write report.md, results.json, grid.png (a PIL image, if given) and curves.png into `out`; `paper_table` puts
    the paper's layout first (the toy columns follow when any run has them)."""
    out.mkdir(parents=True, exist_ok=True)
    if grid is not None:
        grid.save(out / "grid.png")
    curve_path = plot_curves(curves, out / "curves.png")
    tables = [table(rows, PAPER_COLUMNS)] if paper_table else []
    if not paper_table or any(c[0] in r for c in COLUMNS[:5] for r in rows.values()):
        tables.append(table(rows))
    md = ["# safeprune report", ""] + [line for t in tables for line in (t, "")]
    md += [f"- {n}" for n in notes]
    md += ["", "![grid](grid.png)" if grid is not None else "", "![curves](curves.png)" if curve_path else ""]
    (out / "report.md").write_text("\n".join(md).rstrip() + "\n")
    (out / "results.json").write_text(json.dumps({"methods": rows, **(extra or {})}, indent=1))
    return out / "report.md"


# ----------------------------------------------------------------------------- the CLI: report over run folders


def _result_files(folder: Path) -> list[Path]:
    found = [p for p in (folder / "results.json", folder / "eval" / "results.json") if p.is_file()]
    return found + sorted(folder.glob("eval/*/results.json")) + sorted(
        p for p in folder.glob("*/results.json") if p.parent.name != "eval")


def read_run(folder: Path) -> tuple[dict, list[dict], dict]:
    """(results row, curve points, {protocol: evaluation folder}) of one run folder; the row also carries training
    time when known."""
    paths = _result_files(folder)
    check(bool(paths), f"{str(folder)!r} has no results.json; evaluate it first with "
                       f"`safeprune evaluate --model {folder} --out {folder}/eval`")
    row, evals = {}, {}
    for path in paths:
        data = read_json(path, "results file")
        protocol = data.get("protocol")
        metrics = data.get("metrics", data)
        check(isinstance(metrics, dict), f"{str(path)!r}: `metrics` is not a JSON object; re-run the evaluation")
        row |= metrics if in_toy_world(protocol) else {f"{protocol}/{k}": v for k, v in metrics.items()}
        evals.setdefault(protocol, path.parent)
    summary = folder / "summary.json"
    if summary.is_file():
        row["train_s"] = read_json(summary, "run summary").get("wall_s")
    curve = []
    if (folder / "metrics.jsonl").is_file():
        for line in read_text(folder / "metrics.jsonl", "metrics log").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill: the curve has one point fewer
            if isinstance(rec, dict) and any(k.startswith("eval/") for k in rec):
                curve.append(rec)
    return row, curve, evals


def _nudity_vs_teacher(rows: dict[str, dict]) -> None:
    """The paper reports NudeNet counts relative to the unpruned teacher."""
    teacher = next((r for n, r in rows.items() if "teacher" in n.lower() and "nudity/nudenet_images" in r), None)
    if teacher and teacher["nudity/nudenet_images"]:
        for r in rows.values():
            if "nudity/nudenet_images" in r:
                r["nudity/nudenet_vs_teacher"] = 100 * (r["nudity/nudenet_images"] / teacher["nudity/nudenet_images"] - 1)


def evaluation_grid(evals: dict[str, dict], protocol: str = "styles", per_role: int = 4):
    """Fig. 1 from evaluated images (no sampling): rows = runs, columns = the first forget then retain records of
    the first run, matched by (prompt, seed) in every other run."""
    from safeprune.sampling import load_images, read_image_folder
    from safeprune.viz import make_grid

    runs = {name: ev[protocol] / "images" for name, ev in evals.items()
            if protocol in ev and (ev[protocol] / "images").is_dir()}
    if not runs:
        return None
    first = next(iter(runs.values()))
    columns = [(role, r) for role in ("forget", "retain", "neutral") if (first / role / "prompts.jsonl").is_file()
               for r in read_image_folder(first / role)[:per_role]]
    rows = []
    for folder in runs.values():
        tiles = []
        for role, col in columns:
            recs = read_image_folder(folder / role) if (folder / role / "prompts.jsonl").is_file() else []
            match = [r for r in recs if r["prompt"] == col["prompt"] and r["seed"] == col["seed"]]
            check(bool(match), f"{folder / role} has no image for prompt {col['prompt']!r} seed {col['seed']}; "
                               "evaluate every run with the same protocol and prompts")
            tiles.append(load_images(folder / role, match[:1])[0])
        rows.append(tiles)
    labels = [("F: " if role == "forget" else "") + col.get("concept", col["prompt"])[-28:] for role, col in columns]
    return make_grid(rows, list(runs), labels, scale=max(1, 128 // rows[0][0].shape[0]))


def run(cfg: Config, args) -> int:
    from safeprune.data.toyworld import ToyWorld
    from safeprune.sampling import load_model

    folders = [Path(r) for r in args.runs]
    for folder in folders:
        check(folder.is_dir(), f"run folder {str(folder)!r} not found; pass folders written by finetune/evaluate")
    names = [f.name for f in folders]
    check(len(set(names)) == len(names), "two run folders share a name; the report labels rows by folder name")
    data = {f.name: read_run(f) for f in folders}
    order = paper_order(list(data))
    rows = {name: data[name][0] for name in order}
    curves = {name: data[name][1] for name in order}
    evals = {name: data[name][2] for name in order}
    _nudity_vs_teacher(rows)
    paper = any(c[0] in r for c in PAPER_COLUMNS for r in rows.values())
    with atomic_folder(cfg.paths.out) as tmp:
        grid = evaluation_grid(evals) or evaluation_grid(evals, "coco")
        if grid is None:  # toy runs: draw the grid with each run's model
            pipes = {}
            for f in (Path(a) for a in args.runs):
                if (f / "plan.json").is_file() or (f / "model_index.json").is_file():
                    pipes[f.name] = load_model(f)
            grid = model_grid(pipes, ToyWorld(cfg.toyworld, seed=cfg.seed), cfg) if pipes else None
        notes = ["paper layout (Sec. 5): style columns average the suppressed styles; CP and CSD are measured against "
                 "each evaluation's --reference model"] if paper else []
        report = write_report(tmp, rows, curves, grid, notes, paper_table=paper)
        save_config(cfg, tmp)
    print(table(rows, PAPER_COLUMNS) if paper else table(rows))
    print(f"wrote {Path(cfg.paths.out) / report.name}")
    return 0
