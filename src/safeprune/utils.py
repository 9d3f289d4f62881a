"""Small shared helpers: atomic files and folders, seeding, devices, safetensors I/O."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from safeprune.errors import UserError, check


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder that becomes `folder` only if the block succeeds.

    A crash or a user error leaves no half-written folder that looks valid.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"output folder {str(folder)!r} already exists and is not empty; pass a new path or delete it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes 0700 folders; a saved model should be as shareable as any other folder
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path in the same folder, renamed onto `path` on success (os.replace is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(name in ("cpu", "cuda") or name.startswith("cuda:"), f"device={name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def require_file(path: str | Path, what: str, hint: str) -> Path:
    """Return `path` if it is a file, else a one-line UserError naming it and how to fix it."""
    path = Path(path)
    check(path.is_file(), f"{what} {str(path)!r} not found; {hint}")
    return path


def load_safetensors(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a corrupt or truncated file into a one-line UserError."""
    from safetensors.torch import load_file

    path = require_file(path, what, "check the path")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for a bad header
        raise UserError(f"{what} {str(path)!r} is corrupt or not safetensors ({type(err).__name__}); "
                        "re-create or re-download it") from err
