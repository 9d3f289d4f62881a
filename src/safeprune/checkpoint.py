"""Atomic, pickle-free training checkpoints: safetensors for every tensor, JSON for the rest.

A checkpoint folder holds `<name>.safetensors` per module, `<name>.optim.safetensors` per optimizer (its
tensor state, with the param groups in the header metadata), and `state.json` (step and anything
JSON-serialisable). It is written to a temporary sibling and renamed, so a kill never leaves a torn one.
Randomness is reseeded from (seed, step) in the loops, so weights + optimizer + step resume exactly.

state.json also holds the SHA-256 of every file and `digest`, the SHA-256 of the state itself: `verify`
finds a corrupt file or a hand-edited step, and `latest` falls back to the newest checkpoint that verifies
(with a warning) when a newer one does not. `check_weights` runs before each checkpoint is written, so a
stop after a divergence only ever names a checkpoint whose weights are finite and bounded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from safeprune.errors import UserError
from safeprune.utils import atomic_folder, load_safetensors, sha256_file

STATE_FILE = "state.json"
STEP_PREFIX = "step_"


class CorruptCheckpoint(UserError):
    """A checkpoint whose files or state do not match the hashes written with it."""


class WeightsDiverged(Exception):
    """Weights that are not finite, or grew far beyond where the run started: not worth a checkpoint."""


def _digest(state: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != "digest"}, sort_keys=True).encode()
                          ).hexdigest()


def _optim_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def _optim_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in json.loads(meta.get("scalars", "{}")).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def save_checkpoint(folder: str | Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] = None, extra: dict | None = None) -> Path:
    """Write modules, optimizers and {step, **extra} atomically into `folder` (replacing an older one)."""
    with atomic_folder(folder, overwrite=True) as tmp:
        for name, module in modules.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        for name, opt in (optimizers or {}).items():
            tensors, meta = _optim_to_flat(opt)
            save_file(tensors, str(tmp / f"{name}.optim.safetensors"), metadata=meta)
        state = {"step": step, **(extra or {}),
                 "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "digest": _digest(state)}, indent=1))
    return Path(folder)


def verify(folder: str | Path) -> dict:
    """The state of checkpoint `folder` if every file matches its hash (CorruptCheckpoint otherwise)."""
    folder = Path(folder)
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {str(folder)!r} has no readable {STATE_FILE} ({type(err).__name__})") \
            from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"checkpoint {str(folder)!r}: {STATE_FILE} holds no step")
    if "digest" not in state:  # written before checkpoints carried hashes: nothing to compare
        return state
    if state["digest"] != _digest(state):
        raise CorruptCheckpoint(f"checkpoint {str(folder)!r}: {STATE_FILE} was edited (its content hash differs)")
    for name, want in state.get("files", {}).items():
        if not (folder / name).is_file() or sha256_file(folder / name) != want:
            raise CorruptCheckpoint(f"checkpoint {str(folder)!r}: {name} is missing or corrupt (content hash differs)")
    return state


def step_folders(root: str | Path) -> list[Path]:
    """The `step_NNNNNNN` checkpoints in `root`, oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()) if root.is_dir() else []


def latest(root: str | Path, set_aside: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint in `root` that verifies, and its state; newer ones that fail are set aside with a
    warning (renamed `.corrupt-step_N`, never deleted: a person may want to look at them; only one process
    of a multi-process run renames, `set_aside`)."""
    for folder in reversed(step_folders(root)):
        try:
            return folder, verify(folder)
        except CorruptCheckpoint as err:
            if set_aside:
                aside = folder.with_name(f".corrupt-{folder.name}")
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
                warnings.warn(f"{err}; moved it to {aside.name} and fell back to the previous checkpoint",
                              stacklevel=2)
    return None


def save_step(root: str | Path, step: int, modules: dict[str, torch.nn.Module],
              optimizers: dict[str, torch.optim.Optimizer] = None, extra: dict | None = None, keep: int = 2) -> Path:
    """`save_checkpoint` into `root/step_NNNNNNN`, then drop all but the newest `keep` step folders."""
    folder = save_checkpoint(Path(root) / f"{STEP_PREFIX}{step:07d}", step, modules, optimizers, extra)
    for old in step_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def max_abs(modules: dict[str, torch.nn.Module]) -> float:
    """The largest |w| over every floating-point parameter and buffer (inf or nan when one is not finite)."""
    peak = 0.0
    for module in modules.values():
        for t in module.state_dict().values():
            if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                value = t.detach().abs().max().float().item()
                if value != value:  # nan
                    return value
                peak = max(peak, value)
    return peak


def check_weights(modules: dict[str, torch.nn.Module], start: float, growth: float, step: int) -> None:
    """WeightsDiverged unless every weight is finite and max |w| <= growth x max(start, 1)."""
    peak = max_abs(modules)
    if not peak <= growth * max(start, 1.0):
        what = "not finite" if peak != peak or peak == float("inf") else \
            f"max |w| = {peak:.3g}, {peak / max(start, 1e-12):.3g}x the {start:.3g} the run started from"
        raise WeightsDiverged(f"weights diverged at step {step} ({what}; finetune.max_weight_growth="
                              f"{growth:g}); not checkpointed")


def load_checkpoint(folder: str | Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] = None) -> dict:
    """Load what `save_checkpoint` wrote into live modules/optimizers; returns the state dict (step, ...)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"no checkpoint in {str(folder)!r} (missing {STATE_FILE}); run without --resume to start")
    state = verify(folder)
    try:
        for name, module in modules.items():
            module.load_state_dict(load_safetensors(folder / f"{name}.safetensors", "checkpoint file"))
        for name, opt in (optimizers or {}).items():
            path = folder / f"{name}.optim.safetensors"
            tensors = load_safetensors(path, "optimizer checkpoint")
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            _optim_from_flat(opt, tensors, meta)
    except (RuntimeError, ValueError, KeyError) as err:  # another architecture (e.g. a different student)
        raise UserError(f"checkpoint {str(folder)!r} does not fit this model ({str(err).splitlines()[0][:160]}); "
                        "resume with the inputs the run started with") from err
    return state
