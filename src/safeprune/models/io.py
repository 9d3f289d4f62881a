"""The saved form of a (pruned, fine-tuned) UNet, and loading it back as a stock diffusers model.

A saved UNet folder (written atomically, no pickles):

  config.json                          the BASE UNet config; for `blocks` the pruned model's own config.
                                       Whenever the architecture is a stock diffusers config (`blocks`,
                                       `magnitude`, `none`) plain `UNet2DConditionModel.from_pretrained`
                                       loads the folder too; `channels` widths need `load_unet`
  plan.json                            the pruning plan, with the base config under "base_config"
  diffusion_pytorch_model.safetensors  the weights (state dict of the pruned UNet)
  safeprune.json                       {"base_model": teacher pipeline folder it came from, or null = the shipped
                                       toy teacher}

`load_unet` rebuilds the architecture by replaying plan.json on the base config ON THE META DEVICE (no
teacher weights, no random init: seconds even at SD scale), then loads the weights strictly with
`assign=True`. Channel-pruned widths cannot be written as a diffusers config (a config has one width per
stage, not per layer), which is why the plan, not config.json, is the source of truth.

Teachers (base models) are named the way diffusers users expect: a local pipeline folder, or a hub id such
as `stabilityai/stable-diffusion-2-1`. A hub id resolves OFFLINE to its snapshot folder in the local Hugging
Face cache (`pretrained_folder`); only `model.allow_download=true` / `--allow-download` lets diffusers fetch it.
Safetensors only, never `trust_remote_code`. safeprune.json keeps a hub id as the id (portable), a local
base model as its absolute path.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from safeprune.errors import UserError, check
from safeprune.utils import HUB_ID, atomic_folder, load_safetensors

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = WEIGHTS + ".index.json"
PLAN = "plan.json"
META = "safeprune.json"


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` names a hub repository rather than a local path (an existing path always wins)."""
    return not Path(name).expanduser().exists() and bool(HUB_ID.match(str(name)))


def pretrained_folder(name: str | Path, revision: str = "", allow_download: bool = False) -> Path:
    """The local folder of a diffusers model: `name` itself, or a hub id's snapshot in the HF cache.

    A hub id is looked up with `local_files_only=not allow_download` (safetensors only), so nothing is fetched
    unless the user asked for it; a miss is a one-line UserError that says how to get the files.
    """
    if not is_hub_id(name):
        return Path(name).expanduser()
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(str(name), revision=revision or None, local_files_only=not allow_download,
                                            use_safetensors=True)
    except (OSError, ValueError) as err:
        if not allow_download:
            raise UserError(f"{name} is not a local folder and is not in the Hugging Face cache; download it "
                            f"(hf download {name}) or pass --allow-download / model.allow_download=true") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot download {name} from the Hugging Face hub ({first[:200]}); check the id, the "
                        "network and HF_HUB_OFFLINE, or download it yourself (hf download ID)") from err
    return Path(folder)


def check_prediction_type(scheduler_config, expected: str, name: str | Path) -> None:
    """A preset that names the prediction type (sd21.yaml: v_prediction) must get a teacher that has it.

    Training a v-prediction teacher's student on the epsilon target (or back) silently ruins it; the usual
    cause is a look-alike checkpoint (stable-diffusion-2-1-base is epsilon, stable-diffusion-2-1 is v).
    """
    actual = scheduler_config.get("prediction_type", "epsilon")
    check(not expected or actual == expected,
          f"teacher {str(name)!r} predicts {actual!r} (its scheduler config) but model.prediction_type={expected!r}; "
          f"pass the intended checkpoint or set model.prediction_type={actual} (or '' to accept the teacher's)")


def save_unet(unet, folder: str | Path, plan: dict | None, base_config: dict | None = None,
              base_model: str | Path | None = None) -> Path:
    """Write `unet` in the saved form (atomic: an existing non-empty `folder` is an error).

    `plan` is what `safeprune.pruning.prune` returned (None = the identity plan); `base_config` defaults to
    the plan's; `base_model` is the teacher pipeline folder the student came from (None = the shipped toy
    teacher). A magnitude-pruned UNet must be saved with its masks applied (`reapply_masks`).
    """
    with atomic_folder(folder) as tmp:
        write_unet(unet, tmp, plan, base_config, base_model)
    return Path(folder)


def write_unet(unet, folder: Path, plan: dict | None, base_config: dict | None, base_model) -> None:
    """The non-atomic core of `save_unet`, for writers that already own a temporary folder."""
    import diffusers
    from safetensors.torch import save_file

    from safeprune.pruning import identity_plan, saved_config
    from safeprune.pruning.measure import unet_config

    plan = dict(plan or identity_plan())
    base_config = base_config or plan.get("base_config") or unet_config(unet)
    plan["base_config"] = base_config
    # Plain diffusers can load the folder when the method's architecture is a config (its `saved_config`).
    own = saved_config(plan)
    header = {"_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers.__version__}
    (folder / "config.json").write_text(json.dumps({**header, **own}, indent=2))
    (folder / PLAN).write_text(json.dumps(plan, indent=1))
    if base_model and not is_hub_id(base_model):
        base_model = str(Path(base_model).resolve())
    (folder / META).write_text(json.dumps({"base_model": str(base_model) if base_model else None}))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    check(not any(t.is_meta for t in tensors.values()), "cannot save a UNet without weights (meta device)")
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def _unet_folder(folder: str | Path) -> Path:
    """The UNet folder inside `folder`: itself, or `unet/` of a pipeline folder."""
    folder = Path(folder)
    check(folder.is_dir(), f"model folder {str(folder)!r} not found; pass a saved UNet or diffusers pipeline folder")
    if (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "unet"
    check((folder / "config.json").is_file(), f"{str(folder)!r} is not a diffusers UNet folder (missing config.json); "
                                              "pass a folder written by `safeprune prune` or a diffusers UNet/pipeline")
    return folder


def load_plan(folder: str | Path) -> dict:
    """The plan of a saved UNet folder, with "base_config"; the identity plan for a plain diffusers UNet."""
    from safeprune.pruning import identity_plan

    folder = _unet_folder(folder)
    if (folder / PLAN).is_file():
        plan = _read_json(folder / PLAN)
        plan.setdefault("base_config", _config_of(folder))
        return plan
    return identity_plan(_config_of(folder))


def base_model_of(folder: str | Path) -> str | None:
    """safeprune.json's base_model of a saved UNet folder (None when absent: the shipped toy teacher)."""
    path = _unet_folder(folder) / META
    return _read_json(path).get("base_model") if path.is_file() else None


def load_unet(folder: str | Path):
    """A saved (pruned) UNet, a plain diffusers UNet folder, or a pipeline's UNet -> UNet2DConditionModel (eval).

    The pruned architecture is rebuilt by replaying plan.json on the base config (meta device), the
    weights load strictly, and a magnitude-pruned model gets its masks back.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from safeprune.pruning import after_load, apply_plan

    folder = _unet_folder(folder)
    plan = load_plan(folder)
    state = _read_weights(folder)
    try:
        with init_empty_weights():
            base = UNet2DConditionModel.from_config(plan["base_config"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"{str(folder)!r} holds an invalid UNet config ({type(err).__name__}: {err})") from err
    unet = apply_plan(base, plan)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(f"weights in {str(folder)!r} do not fit the architecture of its plan/config ({first})") from err
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    check(not leftover, f"{str(folder)!r}: no weights for {leftover[:3]}")
    after_load(unet, plan)
    return unet.eval()


def load_pipeline(folder: str | Path, base_model: str | Path | None = None, device: str | torch.device = "cpu"):
    """A stock diffusers StableDiffusionPipeline from a pipeline folder, or from a saved UNet folder.

    For a UNet folder the rest of the pipeline (VAE, text encoder, tokenizer, scheduler) comes from
    `base_model`, else safeprune.json's base_model, else the shipped toy teacher. Offline, no safety
    checker, progress bar off.
    """
    from diffusers import StableDiffusionPipeline

    from safeprune.models.shipped import teacher_path

    folder = pretrained_folder(folder)  # a hub id: its snapshot in the HF cache (offline)
    check(folder.is_dir(), f"model folder {str(folder)!r} not found; pass a pipeline or saved UNet folder")
    components = {}
    if not (folder / "model_index.json").is_file():
        components["unet"] = load_unet(folder)
        base_model = pretrained_folder(base_model or base_model_of(folder) or teacher_path())
        check((Path(base_model) / "model_index.json").is_file(),
              f"base model {str(base_model)!r} is not a diffusers pipeline folder (no model_index.json); "
              "pass base_model= the teacher pipeline the UNet was pruned from")
        folder = Path(base_model)
    try:
        with _no_loading_bars():
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True,
                                                           use_safetensors=True, **components)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"cannot load a Stable Diffusion pipeline from {str(folder)!r}: "
                        f"{str(err).strip().splitlines()[0]}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def _no_loading_bars():
    """Hide diffusers'/transformers' per-component loading bars (noise around the training bar); restore after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}); re-create the folder") from err
    check(isinstance(data, dict), f"{str(path)!r} must hold a JSON object")
    return data


def _config_of(folder: Path) -> dict:
    config = _read_json(folder / "config.json")
    name = config.get("_class_name", "UNet2DConditionModel")
    check(name == "UNet2DConditionModel", f"{str(folder)!r} holds a {name}, not a UNet2DConditionModel")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        return load_safetensors(folder / WEIGHTS, "UNet weights")
    if (folder / SHARD_INDEX).is_file():  # large UNets are saved in shards with an index
        shards = sorted(set(_read_json(folder / SHARD_INDEX).get("weight_map", {}).values()))
        state = {}
        for shard in shards:
            state.update(load_safetensors(folder / shard, "UNet weights shard"))
        return state
    pickled = [p.name for p in folder.glob("*.bin")]
    hint = f" (found {pickled[0]}: pickled weights are not loaded; re-save with safetensors)" if pickled else ""
    raise UserError(f"{str(folder)!r} has no {WEIGHTS}{hint}; pass a folder written by `safeprune prune`")
