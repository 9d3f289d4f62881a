"""The built wheel ships the presets, concept lists, accelerate configs, evaluation protocols and assets, and a
preset resolves from the installed package alone (importlib.resources), outside the repository."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the project (the build writes build/ and *.egg-info: not into the checkout)."""
    src = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: the installed setuptools builds it (offline; the isolated build would fetch one)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = dist.glob("safeprune-*.whl")
    return path


def test_wheel_contains_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = ["safeprune/configs/sd21.yaml", "safeprune/configs/sd15.yaml", "safeprune/configs/toy.yaml",
                "safeprune/configs/concepts/artists.yaml", "safeprune/configs/concepts/nudity.yaml",
                "safeprune/configs/accelerate/ddp_4gpu.yaml", "safeprune/configs/accelerate/fsdp_4gpu.yaml",
                "safeprune/assets/teacher/model_index.json", "safeprune/assets/judge/judge.safetensors"]
    assert not [n for n in expected if n not in names]
    protocols = sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/safeprune/eval/protocols").rglob("*.yaml"))
    assert not [n for n in protocols if n not in names]  # evaluation protocols, once they exist
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: MIT" in text and any(n.endswith("licenses/LICENSE") for n in names)


def test_a_preset_resolves_from_the_unpacked_wheel(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import safeprune, safeprune.config as c; cfg = c.load_config(['sd21', 'concepts/nudity']); "
            "print(safeprune.__file__); print(cfg.finetune.max_steps, cfg.finetune.concepts[0].target); "
            "print(c.preset_path('configs/accelerate/ddp_4gpu.yaml'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    where, recipe, accelerate = done.stdout.splitlines()
    assert where.startswith(str(tmp_path / "site")) and recipe.startswith("20000 ")
    assert "style" not in recipe  # nudity.yaml replaced the artists
    assert accelerate.startswith(str(tmp_path / "site")) and Path(accelerate).is_file()
