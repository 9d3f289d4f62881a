"""Suppression-quality trade-off: Pareto fronts of leakage against fd, one per method, with error bars over seeds.

A point is one configuration of one method (the mean over seeds of its leakage and of fd / distill fd on the same
seed; fd ratios, not raw fd, because the toy world's images change with the seed). Only points that still draw the
object (forget-prompt valid >= `VALID`, blank images are not suppression) can be on a front. Front A dominates
front B when every valid point of B is weakly dominated by some valid point of A (no more leakage and no higher fd
ratio) - the usual set-dominance of multi-objective comparisons; methods without a valid point dominate nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VALID = 0.9  # forget-prompt valid below this is erasing the object, not the concept


def points(records: list[dict]) -> dict[str, list[dict]]:
    """method -> one point per configuration from sweep records {method, config, seed, leakage, fd, forget_valid,
    retention, overrides}; the `distill` records (config 0) give each seed's fd reference."""
    ref = {r["seed"]: r["fd"] for r in records if r["method"] == "distill"}
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        if r["method"] != "distill" and r["seed"] in ref:
            groups.setdefault((r["method"], r["config"]), []).append(r)
    out: dict[str, list[dict]] = {}
    for (method, config), rs in sorted(groups.items()):
        leak = np.array([r["leakage"] for r in rs])
        ratio = np.array([r["fd"] / max(ref[r["seed"]], 1e-9) for r in rs])
        out.setdefault(method, []).append({
            "config": config, "overrides": rs[0].get("overrides", []), "seeds": len(rs),
            "leakage": float(leak.mean()), "leakage_std": float(leak.std()),
            "fd_ratio": float(ratio.mean()), "fd_ratio_std": float(ratio.std()),
            "forget_valid": float(np.mean([r["forget_valid"] for r in rs])),
            "retention": float(np.mean([r["retention"] for r in rs]))})
    return out


def _weakly_dominates(a: dict, b: dict) -> bool:
    return a["leakage"] <= b["leakage"] and a["fd_ratio"] <= b["fd_ratio"]


def front(pts: list[dict]) -> list[dict]:
    """The valid points no other valid point strictly improves on, by leakage."""
    valid = [p for p in pts if p["forget_valid"] >= VALID]
    keep = [p for p in valid if not any(_weakly_dominates(q, p) and (q["leakage"], q["fd_ratio"]) !=
                                        (p["leakage"], p["fd_ratio"]) for q in valid)]
    return sorted(keep, key=lambda p: p["leakage"])


def dominates(a: list[dict], b: list[dict]) -> bool:
    fa, fb = front(a), front(b)
    return bool(fa) and all(any(_weakly_dominates(p, q) for p in fa) for q in fb)


def plot(pts: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (method, ps) in enumerate(pts.items()):
        colour = f"C{i}"
        for p in ps:
            ax.errorbar(p["fd_ratio"], p["leakage"], xerr=p["fd_ratio_std"], yerr=p["leakage_std"], fmt="o",
                        color=colour, mfc=colour if p["forget_valid"] >= VALID else "none", capsize=2, alpha=0.8)
        f = front(ps)
        if f:
            ax.plot([p["fd_ratio"] for p in f], [p["leakage"] for p in f], "-", color=colour, label=method)
        else:
            ax.plot([], [], "o", color=colour, mfc="none", label=f"{method} (no valid point)")
    ax.axvline(1.1, color="grey", ls=":", lw=1)
    ax.axhline(0.1, color="grey", ls=":", lw=1)
    ax.set_xscale("log")  # the ratios span 0.7x to 20x; the region that matters is near 1
    ax.set(xlabel="fd / distill fd (same seed, log scale)", ylabel="leakage", title=title or "leakage vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(pts: dict[str, list[dict]], focus: str = "bilevel") -> str:
    lines = ["| method | config | overrides | leakage | fd / distill | forget valid | retention | on front |",
             "|---|---|---|---|---|---|---|---|"]
    for method, ps in pts.items():
        on = {p["config"] for p in front(ps)}
        for p in ps:
            lines.append(f"| {method} | {p['config']} | `{' '.join(p['overrides']) or '(default)'}` | "
                         f"{p['leakage']:.2f} ± {p['leakage_std']:.2f} | {p['fd_ratio']:.2f} ± {p['fd_ratio_std']:.2f} | "
                         f"{p['forget_valid']:.2f} | {p['retention']:.2f} | {'yes' if p['config'] in on else ''} |")
    if focus in pts:
        lines.append("")
        for method in (m for m in pts if m != focus):
            lines.append(f"- {focus}'s front dominates {method}'s: {'yes' if dominates(pts[focus], pts[method]) else 'no'};"
                         f" {method}'s dominates {focus}'s: {'yes' if dominates(pts[method], pts[focus]) else 'no'}")
    return "\n".join(lines) + "\n"
