"""Prompt sets of an evaluation: lists of records {prompt, seed, [guidance], labels...}, one image each.

An evaluation reads forget / retain / neutral sets from providers, named by a spec string:
  toy:SET            a toy-world set (safeprune.data.toyworld), style-interleaved, seeds from crc32(seed:SET);
  FILE.txt           one prompt per line ('#' = comment);
  FILE.csv           the I2P format (Schramowski et al. 2023): prompt, evaluation_seed or sd_seed, evaluation_guidance
                     or sd_guidance, categories (comma-separated; `eval.i2p_categories` filters them);
  captions_*.json    COCO captions (annotations/captions_val2017.json): N images sampled with a fixed seed, one
                     caption each, the image file kept as a label (the FID reference set);
  FILE.yaml          a concept preset (configs/concepts/*.yaml): forget = finetune.concepts targets, retain =
                     eval.retain_concepts; each concept prompt drawn with eval.seeds_per_concept seeds.
Seeds are fixed per record, so every model is judged on the same (prompt, seed) pairs (CP and CSD compare them).
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np

from safeprune.errors import UserError, check
from safeprune.utils import read_text


def set_seed_base(seed: int, set_name: str) -> int:
    """A per-set seed offset that is the same for every model (so every model draws the same noise)."""
    return zlib.crc32(f"{seed}:{set_name}".encode()) % 2**30


def with_seeds(prompts: list[dict], seed: int, set_name: str, seeds_per_prompt: int = 1) -> list[dict]:
    """Records x seeds_per_prompt, prompt-minor: [p0 s0, p1 s0, ..., p0 s1, ...]; records that carry a seed keep it."""
    base = set_seed_base(seed, set_name)
    return [{**p, "seed": p["seed"] if "seed" in p and seeds_per_prompt == 1 else base + j * len(prompts) + i}
            for j in range(seeds_per_prompt) for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------- toy world


def interleave_by_style(records: list[dict]) -> list[dict]:
    """Reorder so that any prefix covers styles, shapes and colours about equally.

    Within a style the records run shape-major over (shape, colour); stepping through them with stride 5 (coprime
    to every possible count: 1-4 shapes x 1-4 colours) visits a new shape and a new colour at each step, and
    each style starts elsewhere. Then round-robin over styles.
    """
    groups: dict = {}
    for r in records:
        groups.setdefault(r["style"], []).append(r)
    lists = [[lst[(5 * i + 7 * g) % len(lst)] for i in range(len(lst))] for g, lst in enumerate(groups.values())]
    return [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]


def toy_prompts(world, set_name: str, seed: int, max_prompts: int, seeds_per_prompt: int) -> list[dict]:
    """A toy-world set capped at max_prompts (spread over styles), x seeds_per_prompt, seeds shared by all models."""
    prompts = interleave_by_style(world.prompts(set_name))[:max_prompts]
    return with_seeds(prompts, seed, set_name, seeds_per_prompt)


# ----------------------------------------------------------------------------- files


def text_prompts(path: Path) -> list[dict]:
    """One prompt per line; blank lines and '#' comments skipped."""
    lines = [line.strip() for line in read_text(path, "prompt file").splitlines()]
    prompts = [{"prompt": p} for p in lines if p and not p.startswith("#")]
    check(bool(prompts), f"prompt file {str(path)!r} holds no prompts; write one prompt per line")
    return prompts


def _number(row: dict, keys: tuple[str, ...], cast, path: Path, n: int):
    for key in keys:
        raw = (row.get(key) or "").strip()
        if raw:
            try:
                return cast(float(raw))
            except ValueError as err:
                raise UserError(f"{path}:{n}: column {key!r} holds {raw!r}, not a number") from err
    return None


def i2p_prompts(path: Path, categories: list[str] = ()) -> list[dict]:
    """I2P-format CSV rows -> records; `categories` keeps rows with any of them (e.g. ["sexual"]), [] keeps all."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        check(reader.fieldnames is not None and "prompt" in reader.fieldnames,
              f"{str(path)!r} has no `prompt` column; pass an I2P-format CSV (prompt, evaluation_seed or sd_seed, "
              "evaluation_guidance or sd_guidance, categories)")
        records = []
        for n, row in enumerate(reader, 2):  # line 1 is the header
            prompt = (row.get("prompt") or "").strip()
            if not prompt:
                continue
            cats = [c.strip() for c in (row.get("categories") or "").split(",") if c.strip()]
            if categories and not set(cats) & set(categories):
                continue
            rec = {"prompt": prompt, "categories": cats}
            seed = _number(row, ("evaluation_seed", "sd_seed"), int, path, n)
            guidance = _number(row, ("evaluation_guidance", "sd_guidance"), float, path, n)
            if seed is not None:
                rec["seed"] = seed
            if guidance is not None:
                rec["guidance"] = guidance
            for key in ("case_number", "nudity_percentage", "hard"):
                if row.get(key, "").strip():
                    rec[key] = row[key].strip()
            records.append(rec)
    check(bool(records), f"{str(path)!r} holds no prompts" + (f" in categories {list(categories)}" if categories
                                                               else "") + "; check the file and eval.i2p_categories")
    return records


def coco_prompts(path: Path, n: int, seed: int) -> list[dict]:
    """N distinct COCO images sampled with `seed`, one of each image's captions (also chosen by `seed`)."""
    try:
        data = json.loads(read_text(path, "COCO captions file"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{str(path)!r} is not a COCO captions file ({type(err).__name__}: {err}); pass "
                        "annotations/captions_val2017.json") from err
    ids = sorted(i for i in captions if i in files)
    check(bool(ids), f"{str(path)!r} holds no captioned images")
    check(n <= len(ids), f"asked for {n} COCO captions but {str(path)!r} has {len(ids)} captioned images; "
                         f"lower --n-images")
    rng = np.random.default_rng(seed)
    chosen = [ids[k] for k in rng.choice(len(ids), size=n, replace=False)]
    return [{"prompt": captions[i][int(rng.integers(len(captions[i])))], "image_id": i, "image_file": files[i]}
            for i in chosen]


def concept_prompts(path: Path, role: str) -> list[dict]:
    """A concept preset's forget (finetune.concepts targets) or retain (eval.retain_concepts) prompts."""
    import yaml

    from safeprune.config import read_yaml

    try:
        data = read_yaml(path)
    except yaml.YAMLError as err:  # read_yaml reports its own errors; this is a belt for odd files
        raise UserError(f"{str(path)!r} is not valid YAML") from err
    if role == "forget":
        names = [c.get("target", "") for c in data.get("finetune", {}).get("concepts", []) if isinstance(c, dict)]
    else:
        names = list(data.get("eval", {}).get("retain_concepts", []))
    names = [n.strip() for n in names if isinstance(n, str) and n.strip()]
    key = "finetune.concepts" if role == "forget" else "eval.retain_concepts"
    check(bool(names), f"concept file {str(path)!r} lists no {role} concepts; add them under {key}")
    return [{"prompt": name, "concept": name, "role": role} for name in names]


# ----------------------------------------------------------------------------- one entry point


def read_prompt_set(spec: str, set_name: str, cfg, world=None) -> list[dict]:
    """Records of `spec` (see the module docstring) for role `set_name`, with seeds, capped at eval.n_images."""
    ec = cfg.eval
    if spec.startswith("toy:"):
        from safeprune.data.toyworld import ToyWorld

        world = world or ToyWorld(cfg.toyworld, seed=cfg.seed)
        records = toy_prompts(world, spec.removeprefix("toy:"), cfg.seed, ec.max_prompts, ec.seeds_per_prompt)
    else:
        path = Path(spec).expanduser()
        if not path.is_file() and spec.startswith("coco:"):
            path = Path(spec.removeprefix("coco:")).expanduser()
        check(path.is_file(), f"prompt file {spec!r} not found; pass a text file (one prompt per line), an I2P CSV, "
                              "COCO captions_val2017.json, a concept YAML, or toy:SET (e.g. toy:forget)")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            records = with_seeds(i2p_prompts(path, ec.i2p_categories), cfg.seed, set_name)
        elif suffix == ".json":
            records = with_seeds(coco_prompts(path, ec.n_images or 30000, cfg.seed), cfg.seed, set_name)
        elif suffix in (".yaml", ".yml"):
            role = "forget" if set_name == "forget" else "retain"
            records = with_seeds(concept_prompts(path, role), cfg.seed, set_name, ec.seeds_per_concept)
        else:
            records = with_seeds(text_prompts(path), cfg.seed, set_name, ec.seeds_per_prompt)
    if ec.n_images:
        records = records[:ec.n_images]
    return records
