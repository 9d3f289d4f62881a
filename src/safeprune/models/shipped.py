"""The embedded default models shipped in `safeprune/assets/`: the toy teacher pipeline and the judge."""

from __future__ import annotations

from pathlib import Path

from safeprune.errors import check
from safeprune.models.io import load_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def teacher_path() -> Path:
    """Folder of the shipped toy teacher: a stock diffusers StableDiffusionPipeline folder."""
    path = ASSETS / "teacher"
    check((path / "model_index.json").is_file(),
          f"the shipped toy teacher is missing ({path / 'model_index.json'}); reinstall safeprune or train one "
          "with `safeprune pretrain teacher --out DIR`")
    return path


def judge_path() -> Path:
    """Folder of the shipped judge (judge.safetensors + judge.json)."""
    return ASSETS / "judge"


def load_teacher(device: str = "cpu"):
    """The shipped toy teacher as a diffusers StableDiffusionPipeline (offline, no safety checker)."""
    return load_pipeline(teacher_path(), device=device)
