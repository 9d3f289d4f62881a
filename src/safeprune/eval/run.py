"""One evaluation = a protocol's prompt sets + reference sets + metrics, drawn to disk and scored.

Protocols are YAML presets shipped in safeprune/eval/protocols/ (found with importlib.resources): `metrics`, `sets`
({role: prompt spec}, roles forget / retain / neutral) and `reference_sets` ({role: spec}). Spec words: `coco`
(eval.coco_dir), `concepts:NAME` (configs/concepts/NAME.yaml), `toy:SET`, or a file (safeprune.eval.prompts).

Order of work: resolve every input and weight (a missing one is a UserError before any image is drawn), draw the
images of every set into OUT/images/ROLE (and the reference model's into OUT/reference/ROLE) with resume, then
score them from disk. `eval.images` scores an earlier evaluation's folders without sampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from safeprune.config import CONFIG_DIR, Config
from safeprune.errors import UserError, check, choose
from safeprune.eval import extractors as ex
from safeprune.eval.field import NEEDS
from safeprune.eval.prompts import read_prompt_set
from safeprune.eval.protocols import protocol_files
from safeprune.eval.references import read_reference

STATE_FILE = "evaluation.json"
RESULTS_FILE = "results.json"


def load_protocol(name: str) -> dict:
    path = choose("evaluation protocol", name, protocol_files())
    return yaml.safe_load(path.read_text())


def metric_names(cfg: Config, protocol: dict) -> list[str]:
    from safeprune.eval.metrics import METRICS

    names = list(cfg.eval.metrics) or list(protocol["metrics"])
    for name in names:
        choose("metric", name, METRICS)
    return names


def _coco_captions(cfg: Config) -> Path:
    check(bool(cfg.eval.coco_dir), "the coco protocol needs COCO val2017: pass --coco-dir DIR (with "
                                   "annotations/captions_val2017.json and val2017/)")
    path = Path(cfg.eval.coco_dir).expanduser() / "annotations" / "captions_val2017.json"
    check(path.is_file(), f"{path} not found; --coco-dir must hold annotations/captions_val2017.json and val2017/")
    return path


def _spec_path(spec: str, cfg: Config) -> str:
    if spec == "coco":
        return str(_coco_captions(cfg))
    if spec.startswith("concepts:"):
        return str(CONFIG_DIR / "concepts" / f"{spec.removeprefix('concepts:')}.yaml")
    return spec


def prompt_sets(cfg: Config, protocol: dict) -> dict[str, list[dict]]:
    """{role: records}; eval.prompts replaces the protocol's sets (a concept YAML fills forget and retain)."""
    sets = dict(protocol["sets"])
    if cfg.eval.prompts:
        concept_file = cfg.eval.prompts.endswith((".yaml", ".yml"))
        sets = {role: cfg.eval.prompts for role in (sets if concept_file else list(sets)[:1])}
    check(all(sets.values()), protocol.get("needs_prompts", "this protocol needs --prompts FILE"))
    n_default = protocol.get("n_images", 0)
    if n_default and not cfg.eval.n_images:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_images=n_default))
    return {role: read_prompt_set(_spec_path(spec, cfg), role, cfg) for role, spec in sets.items()}


def reference_sets(cfg: Config, protocol: dict, sets: dict) -> dict:
    specs = dict(protocol.get("reference_sets", {}))
    if cfg.eval.reference_set:
        specs = {role: cfg.eval.reference_set for role in (specs or list(sets)[:1])}
    out = {}
    for role, spec in specs.items():
        if spec == "coco":
            spec = str(_coco_captions(cfg).parents[1] / "val2017")
        out[role] = read_reference(spec, sets.get(role))
    return out


def check_inputs(cfg: Config, names: list[str], references: dict, has_reference_model: bool) -> None:
    """Every weight, reference set and reference model the metrics read: checked before any image is drawn."""
    ec, allow = cfg.eval, cfg.model.allow_download
    hints = {"inception": ("eval.inception_path", ec.inception_path, ex.InceptionFeatures.hint),
             "clip": ("eval.clip_path", ec.clip_path, "set eval.clip_path (--clip) to a CLIP ViT-B/32 folder or hub id"),
             "cmmd_clip": ("eval.cmmd_clip_path", ec.cmmd_clip_path,
                           "set eval.cmmd_clip_path to a CLIP ViT-L/14@336 folder or hub id"),
             "csd": ("eval.csd_path", ec.csd_path, ex.CSDEncoder.hint)}
    for name in names:
        for need in NEEDS.get(name, ()):
            if need in hints:
                key, value, hint = hints[need]
                ex.resolve_weights(value, key, hint, allow)
            elif need == "nudenet":
                ex.nudenet_version()
            elif need == "reference_set":
                check(bool(references), f"metric {name!r} needs a real reference set; pass --reference-set or "
                                        "--coco-dir")
            elif need == "reference_model":
                check(has_reference_model, f"metric {name!r} compares with a reference model; pass --reference MODEL "
                                           "(the paper's: the distilled, unerased pruned model) or set model.teacher")


def _digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def _state(cfg: Config, model, reference, sets: dict) -> dict:
    sample = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "batch_size"}
    return {"protocol": cfg.eval.protocol, "model": str(model or "toy-teacher"),
            "reference": str(reference) if reference else None, "sample": sample, "seed": cfg.seed,
            "sets": {role: {"n": len(r), "digest": _digest(r)} for role, r in sets.items()}}


def open_out(out: Path, state: dict) -> None:
    """Start OUT, or resume it when it holds an unfinished evaluation with the same settings."""
    if (out / RESULTS_FILE).is_file():
        raise UserError(f"{str(out)!r} already holds a finished evaluation ({RESULTS_FILE}); pass a new --out")
    if out.exists() and any(out.iterdir()):
        check((out / STATE_FILE).is_file(), f"output folder {str(out)!r} already exists and is not an evaluation; "
                                            "pass a new path or delete it")
        before = json.loads((out / STATE_FILE).read_text())
        diff = [k for k in state if before.get(k) != state[k]]
        check(not diff, f"{str(out)!r} holds an unfinished evaluation with other settings ({', '.join(diff)}); "
                        "rerun with the same settings to resume, or pass a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_FILE).write_text(json.dumps(state, indent=1))


def _existing_sets(folder: Path, roles: list[str], sub: str = "images") -> dict:
    from safeprune.sampling import read_image_folder

    if (folder / sub).is_dir():
        return {role: (folder / sub / role, read_image_folder(folder / sub / role)) for role in roles
                if (folder / sub / role / "prompts.jsonl").is_file()}
    if sub == "images" and (folder / "prompts.jsonl").is_file():  # a `safeprune generate` folder: one set
        return {roles[0]: (folder, read_image_folder(folder))}
    return {}


def evaluate(cfg: Config, model: str | None, reference: str | None, out: str | Path) -> dict | None:
    """Run cfg.eval.protocol (not toy) for `model`; returns the results record (None on non-main processes)."""
    from accelerate import PartialState

    from safeprune.sampling import generate_to_folder, load_model, merge_prompt_files
    from safeprune.utils import atomic_file, resolve_device

    out = Path(out)
    protocol = load_protocol(cfg.eval.protocol)
    names = metric_names(cfg, protocol)
    state = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
    device = state.device
    reference = reference or cfg.model.teacher or None
    needs_ref = any("reference_model" in NEEDS.get(n, ()) for n in names)
    if cfg.eval.images:  # rescoring: the image folders are the inputs
        folder = Path(cfg.eval.images).expanduser()
        roles = list(protocol["sets"]) if not cfg.eval.prompts else ["forget", "retain"]
        sets = _existing_sets(folder, roles)
        check(bool(sets), f"{str(folder)!r} holds no images/ROLE/prompts.jsonl nor prompts.jsonl; pass an earlier "
                          "evaluation's --out or a `safeprune generate` folder")
        ref_sets = _existing_sets(folder, list(sets), "reference")
        records = {role: r for role, (_, r) in sets.items()}
        references = reference_sets(cfg, protocol, records) if any("reference_set" in NEEDS.get(n, ())
                                                                    for n in names) else {}
        check_inputs(cfg, names, references, bool(ref_sets) or not needs_ref)
        check(not out.exists() or not any(out.iterdir()), f"output folder {str(out)!r} already exists and is not "
                                                          "empty; pass a new path")
        out.mkdir(parents=True, exist_ok=True)
    else:
        records = prompt_sets(cfg, protocol)
        references = reference_sets(cfg, protocol, records) if any("reference_set" in NEEDS.get(n, ())
                                                                    for n in names) else {}
        check_inputs(cfg, names, references, reference is not None or not needs_ref)
        if state.is_main_process:
            open_out(out, _state(cfg, model, reference if needs_ref else None, records))
        state.wait_for_everyone()
        sc = cfg.sample
        draws = [("images", model)] + ([("reference", reference)] if needs_ref else [])
        for sub, which in draws:
            pipe = load_model(which, device)
            for role, recs in records.items():
                generate_to_folder(pipe, recs, out / sub / role, sc.steps, sc.guidance, sc.batch_size, sc.precision,
                                   sc.scheduler, sc.resolution, state.process_index, state.num_processes,
                                   desc=f"{sub}/{role}")
            del pipe
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        sets, ref_sets = {}, {}
        for sub, target in (("images", sets), ("reference", ref_sets)):
            if sub == "images" or needs_ref:
                for role, recs in records.items():
                    target[role] = (out / sub / role, merge_prompt_files(out / sub / role, len(recs)))
    return _score(cfg, names, sets, references, ref_sets, model, reference, out, device, atomic_file,
                  state.num_processes)


def _score(cfg, names, sets, references, ref_sets, model, reference, out: Path, device, atomic_file,
           processes: int = 1) -> dict:
    import time

    from safeprune.eval.field import FolderContext
    from safeprune.eval.metrics import run_metrics

    ctx = FolderContext(cfg, sets, references, ref_sets, device, batch_size=min(cfg.sample.batch_size, 64))
    start = time.perf_counter()
    metrics = run_metrics(ctx, names)
    metrics["eval_images"] = sum(len(r) for _, r in sets.values())
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    record = {"protocol": cfg.eval.protocol, "model": str(model or "toy-teacher"),
              "reference": str(reference) if reference else None,
              "sample": dataclasses.asdict(cfg.sample), "sets": {k: len(r) for k, (_, r) in sets.items()},
              "processes": processes, "detectors": ctx.meta, "metrics": metrics}
    _grid(sets, out / "grid.png")
    with atomic_file(out / RESULTS_FILE) as tmp:  # last: its presence means the evaluation finished
        tmp.write_text(json.dumps(record, indent=1))
    return record


def _grid(sets: dict, path: Path, per_row: int = 8) -> None:
    """One row per set: its first images, as drawn."""
    from safeprune.sampling import load_images
    from safeprune.viz import make_grid, save_image

    rows, labels = [], []
    for role, (folder, recs) in sets.items():
        rows.append(list(load_images(Path(folder), recs[:per_row])))
        labels.append(role)
    scale = max(1, 96 // rows[0][0].shape[0])
    save_image(make_grid(rows, labels, scale=scale), path)
