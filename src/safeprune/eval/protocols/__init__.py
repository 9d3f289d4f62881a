"""The shipped evaluation protocols: one YAML preset per name (coco, styles, nudity, toy), read by
safeprune.eval.run; this module only lists them, so `safeprune evaluate --help` stays import-light."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml


def protocol_files() -> dict[str, Path]:
    """{name: YAML path} of the shipped protocols (found with importlib.resources, so they ship in the wheel)."""
    folder = resources.files(__name__)
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


PROTOCOLS = tuple(sorted(protocol_files()))  # `eval.protocol` values and `--protocol` choices


def in_toy_world(name: str | None) -> bool:
    """Whether protocol `name` is evaluated in the embedded toy world (its YAML says `toy_world: true`); None, a
    results.json from before protocols were recorded, is the toy protocol's. An unknown name is not."""
    path = protocol_files().get(name) if name is not None else None
    return name is None or (path is not None and bool(yaml.safe_load(path.read_text()).get("toy_world")))
