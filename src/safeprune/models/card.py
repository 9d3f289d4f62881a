"""The model card (README.md) of a model folder, and pushing a model folder to the Hugging Face hub.

The card follows the hub's model-card format: YAML metadata (base_model, library_name, pipeline_tag, tags;
what the hub indexes), then what a user of a pruned, concept-suppressed model needs: the pruning plan's
summary (parameters, MACs), the suppressed concepts, the training recipe, and - once the model has been
evaluated - the results table. `write_card` writes it from a dict of facts; `add_results` rewrites it with
an evaluation's metrics (facts are kept in `card.json` beside it so the card can be regenerated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from safeprune.errors import UserError, check
from safeprune.pruning import METHODS

CARD = "README.md"
FACTS = "card.json"  # the facts behind README.md (kept so an evaluation can add its table later)
PRUNE_KEYS = ("params", "macs", "latency_ms")


def write_card(folder: str | Path, facts: dict) -> Path:
    """Write `folder`/README.md (and card.json) from `facts`:

    base_model (hub id or None), method, prune_report (prune_report.json), concepts ([{target, anchor}]),
    recipe ({key: value} of the training recipe), results ({metric: value}) - every key optional.
    """
    folder = Path(folder)
    (folder / FACTS).write_text(json.dumps(facts, indent=1))
    (folder / CARD).write_text(render_card(facts))
    return folder / CARD


def add_results(folder: str | Path, results: dict, source: str = "") -> bool:
    """Add an evaluation's metrics to the card of model folder `folder`. False (nothing written) when it has no
    card, or when README.md was edited since safeprune wrote it (never overwrite someone else's text)."""
    folder = Path(folder)
    if not (folder / FACTS).is_file() or not (folder / CARD).is_file():
        return False
    facts = json.loads((folder / FACTS).read_text())
    if (folder / CARD).read_text() != render_card(facts):
        return False
    facts["results"] = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    facts["results_source"] = source
    write_card(folder, facts)
    return True


def render_card(facts: dict) -> str:
    method = facts.get("method") or "none"
    meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image",
            "tags": ["safeprune", "pruned", f"pruning-{method}", "stable-diffusion", "text-to-image", "diffusers"]
            + (["concept-suppression"] if facts.get("concepts") else [])}
    if facts.get("base_model"):
        meta = {"base_model": facts["base_model"], **meta}
    name = facts.get("base_model") or "the safeprune toy teacher"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {facts.get('title') or f'Pruned student of {name}'}", "",
             f"A `{method}`-pruned UNet distilled from {name} with "
             "safeprune (pruning, distillation from the unpruned teacher and "
             "concept suppression in one bilevel fine-tuning run).", "",
             "```python", "import safeprune  # diffusers loads the pruned UNet class of an imported library only",
             "from diffusers import DiffusionPipeline", "", 'pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO")',
             "```", ""]
    report = facts.get("prune_report") or {}
    if report:
        lines += ["## Pruning", "", "| | teacher | student | ratio |", "|---|---|---|---|"]
        for key in PRUNE_KEYS:
            if f"{key}_before" in report:
                lines.append(f"| {key} | {_fmt(report[f'{key}_before'])} | {_fmt(report[f'{key}_after'])} | "
                             f"{report.get(f'{key}_ratio', '')} |")
        own = getattr(METHODS.get(report.get("method")), "report_keys", ())  # the pruning method's own report fields
        extra = {k: report[k] for k in ("method", *own, "removed_share") if k in report}
        lines += ["", ", ".join(f"{k}: {v}" for k, v in extra.items()), ""]
    concepts = facts.get("concepts") or []
    lines += ["## Suppressed concepts", ""]
    lines += [f"- {c['target']!r}" + (f" -> {c['anchor']!r}" if c.get("anchor") else "") for c in concepts] \
        or ["None: this model was not trained to suppress a concept."]
    lines.append("")
    recipe = facts.get("recipe") or {}
    if recipe:
        lines += ["## Training recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in recipe.items()]
        lines.append("")
    results = facts.get("results") or {}
    lines += ["## Results", ""]
    if results:
        source = facts.get("results_source")
        lines += ([f"Measured by `safeprune evaluate` ({source})." if source else "Measured by `safeprune evaluate`.",
                   ""] + ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in results.items()])
    else:
        lines.append("Not evaluated yet (`safeprune evaluate --model THIS_FOLDER` adds the table here).")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload model folder `folder` to hub repository `repo_id` (created if missing); returns the commit URL.

    Uses huggingface_hub (create_repo + upload_folder); the token comes from `hf auth login` / HF_TOKEN.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    check((folder / "model_index.json").is_file(), f"{str(folder)!r} is not a model folder (no model_index.json); "
                                                   "push the model/ folder of a finished run")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload a safeprune student")
    except Exception as err:  # network, auth and validation errors come as many types
        raise UserError(f"cannot push {str(folder)!r} to the hub repo {repo_id!r} ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); check the id, "
                        "`hf auth login` and HF_HUB_OFFLINE") from err
    return str(getattr(info, "commit_url", info))
