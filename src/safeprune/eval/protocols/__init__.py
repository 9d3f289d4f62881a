"""The shipped evaluation protocols: one YAML preset per name (coco, styles, nudity, toy), read by
safeprune.eval.run; this module only lists them, so `safeprune evaluate --help` stays import-light."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def protocol_files() -> dict[str, Path]:
    """{name: YAML path} of the shipped protocols (found with importlib.resources, so they ship in the wheel)."""
    folder = resources.files(__name__)
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


PROTOCOLS = tuple(sorted(protocol_files()))  # `eval.protocol` values and `--protocol` choices
