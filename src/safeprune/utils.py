"""Small shared helpers: atomic files and folders, seeding and random streams, the learning-rate schedule,
dtypes, devices, hub ids, safetensors I/O."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
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
from safeprune.runs import TMP_INFIX

# The training / autocast precisions by config name (finetune.teacher_dtype, finetune.mixed_precision).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# owner/name as the hub spells repository ids (models and datasets); absolute, ./relative or deeper paths
# never match
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder that becomes `folder` only if the block succeeds.

    A crash or a user error leaves no half-written folder that looks valid. A new output (overwrite=False) is
    locked for the block (`safeprune.runs.lock`) and may only replace an empty folder; overwrite=True (a
    checkpoint the caller owns) moves the old folder aside first, so some complete version is always on disk.
    """
    from safeprune.runs import check_out, lock

    folder = check_out(folder)
    with contextlib.ExitStack() as stack:
        if not overwrite:
            stack.enter_context(lock(folder))
            if folder.exists() and any(folder.iterdir()):
                raise UserError(f"output folder {str(folder)!r} already exists and is not empty; pass a new path or "
                                "delete it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        _clean_siblings(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_INFIX}", dir=folder.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.chmod(0o755)  # mkdtemp makes 0700 folders; a saved model should be as shareable as any other folder
        if not overwrite:
            if folder.exists():
                try:
                    folder.rmdir()  # still empty: anything written there meanwhile is not ours and stays
                except OSError as err:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise UserError(f"output folder {str(folder)!r} was filled by someone else while this command "
                                    "ran; pass a new path") from err
            os.replace(tmp, folder)
            return
        old = folder.parent / f".{folder.name}{TMP_INFIX}old"
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)


def _clean_siblings(folder: Path) -> None:
    """Remove temporary siblings a killed writer of `folder` left: `.NAME.tmp-*`, and `.NAME.XXXXXXXX` (eight
    mkdtemp characters) from versions before the infix. Called under the folder's lock."""
    legacy = re.compile(rf"^\.{re.escape(folder.name)}\.[a-z0-9_]{{8}}$")
    for entry in folder.parent.glob(f".{glob.escape(folder.name)}.*"):
        ours = entry.name.startswith(f".{folder.name}{TMP_INFIX}") or legacy.match(entry.name)
        if ours and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path in the same folder, renamed onto `path` on success (os.replace is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; a file in another encoding is a one-line UserError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                        "UTF-8") from err


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(module: torch.nn.Module, n: int = 3) -> str:
    """A short identity of a model's weights: every tensor name and shape, plus the bytes of `n` tensors spread
    over the state dict (first, middle, last). Cheap at SD scale; two different trainings never collide."""
    state = module.state_dict()
    names = sorted(state)
    digest = hashlib.sha256(json.dumps([[k, list(state[k].shape)] for k in names]).encode())
    for i in sorted({round(j * (len(names) - 1) / max(1, n - 1)) for j in range(n)}) if names else []:
        digest.update(state[names[i]].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def read_json(path: str | Path, what: str, kind: type = dict):
    """A JSON file holding a `kind` (dict or list); bad JSON, another type or non-UTF-8 is a one-line UserError."""
    try:
        data = json.loads(read_text(path, what))
    except ValueError as err:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({str(err).splitlines()[0][:120]}); re-create it") \
            from err
    check(isinstance(data, kind), f"{what} {str(path)!r} holds a {type(data).__name__}, not a JSON "
                                  f"{'object' if kind is dict else 'list'}; re-create it")
    return data
