"""`safeprune report RUN_DIR... --out DIR`: one table, a Fig.-1-style grid and Fig.-4-style curves.

A run folder is anything with evaluation results: `results.json` (or `eval/results.json`) as written by
`safeprune evaluate`; when it is also a fine-tuning run, its `metrics.jsonl` gives the curves (the `eval/*`
keys logged every `finetune.eval_every_steps`) and `summary.json` the training time. The demo calls `write_report`
with the same structures, averaged over seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from safeprune.config import Config, save_config
from safeprune.errors import UserError, check
from safeprune.utils import atomic_folder

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


def table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per model, the COLUMNS that any model has."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    lines = ["| model | " + " | ".join(title for _, title, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(_cell(r, key, fmt) for key, _, fmt in cols) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> Path | None:
    """fd and leakage against training step, one line per method (mean over seeds when they share steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, (key, title) in zip(axes, CURVES):
        for i, (name, points) in enumerate(curves.items()):
            pts = [(p["step"], p[key]) for p in points if key in p]
            if pts:
                steps = sorted({s for s, _ in pts})
                # Earlier lines drawn wider: two_stage's first phase IS distill and would hide its line.
                ax.plot(steps, [np.mean([v for s, v in pts if s == st]) for st in steps], marker="o", label=name,
                        linewidth=1.5 + 2.5 * (len(curves) - 1 - i), markersize=5 + 3 * (len(curves) - 1 - i))
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
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
                 notes: list[str] = (), extra: dict | None = None) -> Path:
    """Write report.md, results.json, grid.png (a PIL image, if given) and curves.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if grid is not None:
        grid.save(out / "grid.png")
    curve_path = plot_curves(curves, out / "curves.png")
    md = ["# safeprune report", "", table(rows), ""]
    md += [f"- {n}" for n in notes]
    md += ["", "![grid](grid.png)" if grid is not None else "", "![curves](curves.png)" if curve_path else ""]
    (out / "report.md").write_text("\n".join(md).rstrip() + "\n")
    (out / "results.json").write_text(json.dumps({"methods": rows, **(extra or {})}, indent=1))
    return out / "report.md"


# ----------------------------------------------------------------------------- the CLI: report over run folders


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    """(results row, curve points) of one run folder; the row also carries training time when known."""
    path = next((p for p in (folder / "results.json", folder / "eval" / "results.json") if p.is_file()), None)
    check(path is not None, f"{str(folder)!r} has no results.json; evaluate it first with "
                            f"`safeprune evaluate --model {folder} --out {folder}/eval`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err.msg}); re-run the evaluation") from err
    row = dict(data.get("metrics", data))
    summary = folder / "summary.json"
    if summary.is_file():
        row["train_s"] = json.loads(summary.read_text()).get("wall_s")
    curve = []
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if any(k.startswith("eval/") for k in rec):
                curve.append(rec)
    return row, curve


def run(cfg: Config, args) -> int:
    from safeprune.data.toyworld import ToyWorld
    from safeprune.sampling import load_model

    folders = [Path(r) for r in args.runs]
    for folder in folders:
        check(folder.is_dir(), f"run folder {str(folder)!r} not found; pass folders written by finetune/evaluate")
    names = [f.name for f in folders]
    check(len(set(names)) == len(names), "two run folders share a name; the report labels rows by folder name")
    data = {f.name: read_run(f) for f in folders}
    rows = {name: row for name, (row, _) in data.items()}
    curves = {name: curve for name, (_, curve) in data.items()}
    with atomic_folder(args.out) as tmp:
        pipes = {}
        for f in folders:
            model = f if (f / "plan.json").is_file() or (f / "model_index.json").is_file() else None
            if model is not None:
                pipes[f.name] = load_model(model)
        grid = model_grid(pipes, ToyWorld(cfg.toyworld, seed=cfg.seed), cfg) if pipes else None
        report = write_report(tmp, rows, curves, grid)
        save_config(cfg, tmp)
    print(table(rows))
    print(f"wrote {Path(args.out) / report.name}")
    return 0
