"""The saved form of a (pruned, fine-tuned) student, and loading it back with stock diffusers.

A model folder (`RUN/model/`, written by `safeprune prune` and `safeprune finetune`) is a COMPLETE diffusers
pipeline folder, so `DiffusionPipeline.from_pretrained(folder)` loads it wherever safeprune is installed:

  model_index.json     the teacher's, with "unet": ["safeprune", "PrunedUNet2DConditionModel"] for a `channels`
                       student (safeprune.models.pruned_unet: a ModelMixin/ConfigMixin subclass whose config
                       records the pruned widths) or ["diffusers", "UNet2DConditionModel"] for blocks /
                       magnitude / none students (stock architectures)
  unet/                config.json (the model's own config), diffusion_pytorch_model.safetensors, plan.json
                       (the pruning plan, with the base config under "base_config": magnitude masks and the
                       plan's record; diffusers ignores it), safeprune.json ({"base_model": the teacher's hub id,
                       or null})
  vae/ text_encoder/ tokenizer/ scheduler/ ...   COPIED from the teacher (safetensors and configs; pickles
                       are skipped), so the folder survives being moved or uploaded. A reference to the teacher
                       would be smaller, but model_index.json cannot point into another folder or repository,
                       and a local path breaks when either folder moves; the hub id is kept as metadata
                       (safeprune.json, the model card's base_model), never an absolute path.
  README.md            the model card (safeprune.models.card)

`save_unet` (Python API) still writes a bare UNet folder (the unet/ part alone); `load_unet` and
`load_pipeline` also read the layouts of earlier versions: a bare UNet folder whose config.json holds the
BASE config next to plan.json (the plan's widths are then computed from the plan, not replayed through
torch-pruning), with the rest of the pipeline from safeprune.json's base_model. They also take a run
folder (its model/), and a training checkpoint (`RUN/checkpoints/step_N/`: the student weights and, in
state.json, the plan and the teacher the run used).

Teachers (base models) are named the way diffusers users expect: a local pipeline folder, or a hub id such
as `stabilityai/stable-diffusion-2-1`. A hub id resolves OFFLINE to its snapshot folder in the local Hugging
Face cache (`pretrained_folder`); only `model.allow_download=true` / `--allow-download` lets diffusers fetch it.
Safetensors only, never `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
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
    unless the user asked for it; a miss is a one-line UserError that says how to get the files. A shipped
    teacher's name (`toy`, `toy-dit`: safeprune.models.shipped.TEACHERS) is its folder in the package.
    """
    from safeprune.models import shipped

    if str(name) in shipped.TEACHERS:
        return shipped.shipped_teacher(str(name))
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


MODEL = "model"  # a run folder's model subfolder
# what check_supported_unet suggests instead, per family
BACKBONE_LABELS = {"sd": "an SD 1.x / 2.x model (e.g. stable-diffusion-v1-5, stable-diffusion-2-1)"}
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack", ".h5")  # never copied into a model folder
CHECKPOINT_STATE = "state.json"  # marks a training checkpoint (safeprune.checkpoint)


def unet_class(plan: dict):
    """(model class, its config) of the student a plan describes: what config.json holds and what loads it. The
    method's `saved_config` says the config; one with `pruned_widths` (channels) is safeprune's model class of
    that denoiser (safeprune.models.pruned_unet)."""
    from safeprune.models.pruned_unet import PRUNED
    from safeprune.pruning import saved_config

    config = {k: v for k, v in saved_config(plan).items() if not k.startswith("_")}
    base = denoiser_class({**config, "_class_name": plan.get("model_class")})
    return (PRUNED[base.__name__] if "pruned_widths" in config else base), config


def denoiser_class(config: dict):
    """The diffusers model class a plan's config (no `_class_name`: plans keep only init arguments) builds: the
    family denoiser class (safeprune.backbones) whose __init__ takes the most of its keys, UNet2DConditionModel
    on a tie (configs of every SD-era plan)."""
    import inspect

    import diffusers

    from safeprune.backbones import denoiser_classes

    if config.get("_class_name") in denoiser_classes() and hasattr(diffusers, config["_class_name"]):
        return getattr(diffusers, config["_class_name"])
    classes = [getattr(diffusers, n) for n in denoiser_classes() if hasattr(diffusers, n)]
    known = [sum(k in inspect.signature(c.__init__).parameters for k in config) for c in classes]
    return classes[max(range(len(classes)), key=lambda i: (known[i], -i))]


def build_unet(plan: dict, folder: str | Path = "the plan"):
    """The student's architecture on the meta device (no weights, no random init: seconds at SD scale)."""
    from accelerate import init_empty_weights

    cls, config = unet_class(plan)
    try:
        with init_empty_weights():
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"{str(folder)!r} holds an invalid UNet config ({type(err).__name__}: {err})") from err


def check_supported_unet(config, where: str, families: tuple[str, ...] = ("sd",)) -> None:
    """A denoiser of one of `families` (safeprune.backbones keys; `finetune` takes them all, `prune` SD 1.x/2.x
    UNets so far): anything else is one line instead of a traceback (e.g. other added embeddings)."""
    from safeprune.backbones import backbone_for_config

    config = dict(config)
    family = backbone_for_config({"_class_name": config.get("_class_name") or denoiser_class(config).__name__,
                                  **config}, where)
    check(family.name in families, f"{where} is {family.label}, which this command does not support yet; use "
                                   f"{' or '.join(BACKBONE_LABELS.get(f, f) for f in families)}")


def save_unet(unet, folder: str | Path, plan: dict | None, base_config: dict | None = None,
              base_model: str | Path | None = None) -> Path:
    """Write `unet` as a bare UNet folder (atomic: an existing non-empty `folder` is an error).

    `plan` is what `safeprune.pruning.prune` returned (None = the identity plan); `base_config` defaults to
    the plan's; `base_model` is the teacher it came from (a hub id, a local pipeline folder, or None = the
    shipped toy teacher; a local folder is recorded as `teacher_path`, a hint for `load_pipeline` on this
    machine). A magnitude-pruned UNet must be saved with its masks applied (`reapply_masks`). Use
    `save_model` for a folder that stock diffusers loads as a pipeline.
    """
    with atomic_folder(folder) as tmp:
        write_unet(unet, tmp, plan, base_config, base_model)
    return Path(folder)


def write_unet(unet, folder: Path, plan: dict | None, base_config: dict | None, base_model) -> None:
    """The non-atomic core of `save_unet`, for writers that already own a temporary folder.

    `unet` may be any object with `state_dict()` (an FSDP gather view too): the architecture comes from the
    plan, and the weights must fit it exactly (a strict load into the plan's architecture, checked here).
    """
    import diffusers
    from safetensors.torch import save_file

    from safeprune.pruning import identity_plan
    from safeprune.pruning.measure import unet_config

    plan = dict(plan or identity_plan())
    plan["base_config"] = base_config or plan.get("base_config") or unet_config(unet)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    check(not any(t.is_meta for t in tensors.values()), "cannot save a UNet without weights (meta device)")
    cls, config = unet_class(plan)
    _fit(build_unet(plan), tensors, "the UNet to save")  # what is saved must load back into its config
    header = {"_class_name": cls.__name__, "_diffusers_version": diffusers.__version__}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**header, **config}, indent=2))
    (folder / PLAN).write_text(json.dumps(plan, indent=1))
    hub = str(base_model) if base_model and is_hub_id(base_model) else None
    local = str(Path(base_model).resolve()) if base_model and not hub else None
    (folder / META).write_text(json.dumps({"base_model": hub, **({"teacher_path": local} if local else {})}))
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def save_model(unet, folder: str | Path, plan: dict | None, teacher_dir: str | Path, base_model: str | None = None,
               card: dict | None = None, overwrite: bool = False) -> Path:
    """Write a complete diffusers pipeline folder (atomic): the student UNet + the teacher's other components.

    `teacher_dir` is the teacher's local pipeline folder; `base_model` its hub id (None for a local or the
    toy teacher: no path is recorded); `card` the model card's facts (safeprune.models.card.write_card).
    `overwrite` replaces an existing folder (only for a folder the caller created, e.g. a resumed run's model).
    """
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_model(unet, tmp, plan, teacher_dir, base_model, card)
    return Path(folder)


def write_model(unet, folder: Path, plan: dict | None, teacher_dir: str | Path, base_model: str | None,
                card: dict | None = None) -> None:
    """The non-atomic core of `save_model`."""
    import diffusers

    teacher_dir = Path(teacher_dir)
    index = _read_json(teacher_dir / "model_index.json")
    hub = base_model if base_model and is_hub_id(base_model) else None
    from safeprune.backbones import backbone_for_pipeline

    # the denoiser's component name (unet / transformer) in the teacher's pipeline
    component = backbone_for_pipeline(index.get("_class_name", "StableDiffusionPipeline"),
                                      f"teacher {str(teacher_dir)!r}").denoiser
    write_unet(unet, folder / component, plan, None, hub)
    for name, spec in index.items():
        if name.startswith("_") or name == component or not (isinstance(spec, list) and spec[0]):
            continue
        source = teacher_dir / name
        check(source.is_dir(), f"teacher {str(teacher_dir)!r} lists {name} in model_index.json but has no {name}/")
        shutil.copytree(source, folder / name, ignore=lambda _, names: [n for n in names if n.endswith(PICKLES)])
    cls = json.loads((folder / component / "config.json").read_text())["_class_name"]
    library = "safeprune" if cls.startswith("Pruned") else "diffusers"  # safeprune.models.pruned_unet
    index = {k: v for k, v in index.items() if k != "_name_or_path"}
    index |= {"_diffusers_version": diffusers.__version__, component: [library, cls]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if card is not None:
        from safeprune.models.card import write_card

        write_card(folder, {"base_model": hub, **card})


def model_folder(folder: str | Path) -> Path:
    """A run folder's model/ (when it has one), else `folder` itself."""
    folder = Path(folder)
    inner = folder / MODEL
    return inner if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file() \
        and inner.is_dir() else folder


def _unet_folder(folder: str | Path) -> Path:
    """The UNet folder inside `folder`: itself, `unet/` of a pipeline folder, or a run folder's model/unet/."""
    folder = model_folder(folder)
    check(folder.is_dir(), f"model folder {str(folder)!r} not found; pass a saved UNet or diffusers pipeline folder")
    if (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        from safeprune.backbones import denoiser_component

        folder = folder / (denoiser_component(folder) or "unet")
    check((folder / "config.json").is_file(), f"{str(folder)!r} is not a diffusers UNet folder (missing config.json); "
                                              "pass a folder written by `safeprune prune` or a diffusers UNet/pipeline")
    return folder


def load_plan(folder: str | Path) -> dict:
    """The plan of a saved UNet folder, with "base_config"; the identity plan for a plain diffusers UNet.

    A `channels` folder that diffusers re-saved (no plan.json) gives a plan with its recorded widths."""
    from safeprune.pruning import plan_from_config

    if _is_checkpoint(folder):
        return _checkpoint_model(folder)["plan"]
    folder = _unet_folder(folder)
    config = _config_of(folder)
    if (folder / PLAN).is_file():
        plan = _read_json(folder / PLAN)
        plan.setdefault("base_config", config)
        return plan
    return plan_from_config(config)


def base_model_of(folder: str | Path) -> str | None:
    """Where the rest of a bare UNet folder's pipeline lives: safeprune.json's base_model (a hub id; in older
    folders also a path), else its teacher_path hint; None = the shipped toy teacher."""
    path = _unet_folder(folder) / META
    meta = _read_json(path) if path.is_file() else {}
    return meta.get("base_model") or meta.get("teacher_path")


def load_unet(folder: str | Path):
    """A saved student, a plain diffusers UNet folder, a pipeline's UNet, a run folder's model or a training
    checkpoint -> UNet2DConditionModel (a PrunedUNet2DConditionModel for `channels`), in eval mode.

    The architecture is built from the config (a channels student from its recorded widths; nothing is
    replayed), the weights load strictly, and a magnitude-pruned model gets its masks back.
    """
    from safeprune.pruning import after_load

    if _is_checkpoint(folder):
        record = _checkpoint_model(folder)
        plan, state, where = record["plan"], load_safetensors(record["weights"], "checkpoint weights"), folder
    else:
        where = _unet_folder(folder)
        plan, state = load_plan(where), _read_weights(where)
    unet = _fit(build_unet(plan, where), state, where)
    after_load(unet, plan)
    return unet.eval()


def _fit(unet, state: dict, where):
    """Load `state` strictly into the meta-device `unet` (assign: no copy); a mismatch is a UserError."""
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(f"weights in {str(where)!r} do not fit the architecture of its plan/config ({first})") from err
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    check(not leftover, f"{str(where)!r}: no weights for {leftover[:3]}")
    return unet


def load_pipeline(folder: str | Path, base_model: str | Path | None = None, device: str | torch.device = "cpu"):
    """The family's stock diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...; see
    safeprune.backbones) from a model (pipeline) folder, a run folder, a training
    checkpoint, or a bare saved UNet folder.

    For a bare UNet folder or a checkpoint the rest of the pipeline (VAE, text encoder, tokenizer, scheduler)
    comes from `base_model`, else the recorded teacher, else the shipped toy teacher. Offline, no safety
    checker, progress bar off.
    """
    from safeprune.backbones import backbone_of
    from safeprune.models.shipped import teacher_path

    folder = model_folder(pretrained_folder(folder))  # a hub id: its snapshot in the HF cache (offline)
    check(folder.is_dir(), f"model folder {str(folder)!r} not found; pass a pipeline or saved UNet folder")
    components = {}
    if not (folder / "model_index.json").is_file():
        student = load_unet(folder)
        recorded = _checkpoint_model(folder)["teacher"] if _is_checkpoint(folder) else base_model_of(folder)
        base_model = pretrained_folder(base_model or recorded or teacher_path())
        check((Path(base_model) / "model_index.json").is_file(),
              f"base model {str(base_model)!r} is not a diffusers pipeline folder (no model_index.json); "
              "pass base_model= the teacher pipeline the UNet was pruned from")
        folder = Path(base_model)
        components[backbone_of(folder).denoiser] = student
    with _no_loading_bars():
        pipe = backbone_of(folder).load_pipeline(folder, components)  # the family's stock pipeline class
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def checkpoint_record(plan: dict, teacher: str | Path | None) -> dict:
    """What a training checkpoint's state.json keeps (under "model") so `load_pipeline` can sample from it: the
    student's plan and the teacher (a hub id, the absolute path of a local folder, or None = the toy teacher;
    checkpoints are training state on the training machine, so a local path is fine here)."""
    local = teacher and not is_hub_id(teacher)
    return {"plan": plan, "teacher": str(Path(teacher).resolve()) if local else teacher}


def _is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CHECKPOINT_STATE).is_file() and not (folder / "config.json").is_file()


def _checkpoint_model(folder: str | Path) -> dict:
    """{"plan", "teacher", "weights"} of a training checkpoint (the EMA weights when the run kept an EMA)."""
    folder = Path(folder)
    record = _read_json(folder / CHECKPOINT_STATE).get("model")
    check(isinstance(record, dict) and "plan" in record,
          f"checkpoint {str(folder)!r} does not record its model (written by an older safeprune); resume the run "
          "or sample from the finished run's model/ folder")
    weights = next((folder / f"{n}.safetensors" for n in ("ema", "student") if (folder / f"{n}.safetensors").is_file()),
                   folder / "student.safetensors")
    return {**record, "weights": weights}


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
    from safeprune.backbones import denoiser_classes

    name = config.get("_class_name", "UNet2DConditionModel")
    check(name in denoiser_classes(),
          f"{str(folder)!r} holds a {name}, not a denoiser safeprune supports ({', '.join(denoiser_classes())})")
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
