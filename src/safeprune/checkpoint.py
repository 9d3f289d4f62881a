"""Atomic, pickle-free training checkpoints: safetensors for every tensor, JSON for the rest.

A checkpoint folder holds `<name>.safetensors` per module, `<name>.optim.safetensors` per optimizer (its
tensor state, with the param groups in the header metadata), and `state.json` (step and anything
JSON-serialisable). It is written to a temporary sibling and renamed, so a kill never leaves a torn one.
Randomness is reseeded from (seed, step) in the loops, so weights + optimizer + step resume exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from safeprune.errors import UserError
from safeprune.utils import atomic_folder, load_safetensors

STATE_FILE = "state.json"


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
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    return Path(folder)


def load_checkpoint(folder: str | Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] = None) -> dict:
    """Load what `save_checkpoint` wrote into live modules/optimizers; returns the state dict (step, ...)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"no checkpoint in {str(folder)!r} (missing {STATE_FILE}); run without --resume to start")
    for name, module in modules.items():
        module.load_state_dict(load_safetensors(folder / f"{name}.safetensors", "checkpoint file"))
    for name, opt in (optimizers or {}).items():
        path = folder / f"{name}.optim.safetensors"
        tensors = load_safetensors(path, "optimizer checkpoint")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        _optim_from_flat(opt, tensors, meta)
    return json.loads((folder / STATE_FILE).read_text())
