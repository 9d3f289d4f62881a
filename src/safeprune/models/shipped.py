"""The embedded default models shipped in `safeprune/assets/`: the toy teachers and the judge."""

from __future__ import annotations

from pathlib import Path

from safeprune.errors import check
from safeprune.models.io import load_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Names a teacher flag takes for the shipped teachers: `toy` = the SD-format UNet teacher (the default, also
# model.teacher=""), `toy-dit` = the SD3-class MMDiT teacher (`pretrain teacher --arch dit`).
TEACHERS = {"toy": ("teacher", "unet"), "toy-dit": ("teacher_dit", "dit")}


def shipped_teacher(name: str) -> Path:
    """Folder of a shipped toy teacher (a stock diffusers pipeline folder) by its TEACHERS name."""
    folder, arch = TEACHERS[name]
    path = ASSETS / folder
    check((path / "model_index.json").is_file(),
          f"the shipped toy teacher {name!r} is missing ({path / 'model_index.json'}); reinstall safeprune or train "
          f"one with `safeprune pretrain teacher --arch {arch} --out DIR`")
    return path


def teacher_path() -> Path:
    """Folder of the shipped toy teacher: a stock diffusers StableDiffusionPipeline folder."""
    return shipped_teacher("toy")


def judge_path() -> Path:
    """Folder of the shipped judge (judge.safetensors + judge.json)."""
    return ASSETS / "judge"


def load_teacher(name: str = "", device: str = "cpu"):
    """A teacher pipeline by what model.teacher holds: a shipped teacher's name (TEACHERS), a local folder or a
    cached hub id; "" = the shipped toy teacher (a StableDiffusionPipeline). Offline, no safety checker."""
    from safeprune.models.io import pretrained_folder

    return load_pipeline(pretrained_folder(name) if name else teacher_path(), device=device)
