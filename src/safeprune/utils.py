"""Small shared helpers: atomic files and folders, seeding and random streams, the learning-rate schedule,
dtypes, devices, hub ids, safetensors I/O."""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from safeprune.errors import UserError, check

# The training / autocast precisions by config name (finetune.teacher_dtype, finetune.mixed_precision).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# owner/name as the hub spells repository ids (models and datasets); absolute, ./relative or deeper paths
# never match
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


# ----------------------------------------------------------------------------- random streams
# EDM2's rule: randomness is a pure function of (seed, what it is for, where in the run), never of what
# was drawn before, so resumed runs, other batch sizes and other process counts see the same numbers.
# A stream key is a tuple of ints and names (names hashed with crc32, stable across processes).


def seed_sequence(seed: int, *stream: int | str) -> np.random.SeedSequence:
    """numpy's SeedSequence of (seed, *stream): the one root of every keyed random stream."""
    return np.random.SeedSequence([seed, *(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in stream)])


def numpy_rng(seed: int, *stream: int | str) -> np.random.Generator:
    """A numpy generator that depends only on (seed, *stream)."""
    return np.random.default_rng(seed_sequence(seed, *stream))


def torch_rng(seed: int, *stream: int | str, bits: int = 64) -> torch.Generator:
    """A CPU torch generator that depends only on (seed, *stream), seeded with `bits` (32 or 64) bits of it.

    bits=32 only reproduces the toy teacher's training (recipes/pretrain.py), which was seeded that way.
    """
    words = seed_sequence(seed, *stream).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]) if bits == 64 else int(words[0]))


def warmup_cosine(step: int, peak: float, warmup: int, total: int = 0, final: float = 1.0) -> float:
    """Learning rate at `step` (0-based), a pure function of the step: linear warm-up to `peak` over
    `warmup` steps, then a cosine from `peak` to `final * peak` at step `total` (final = 1: constant)."""
    if step < warmup:
        return peak * ((step + 1) / warmup)
    if final == 1.0:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final + (1.0 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
    path = require_file(path, what, "check the path")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for a bad header
        raise UserError(f"{what} {str(path)!r} is corrupt or not safetensors ({type(err).__name__}); "
                        "re-create or re-download it") from err
