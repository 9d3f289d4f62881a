"""`safeprune prune`: prune a diffusers UNet (the shipped toy teacher by default) and save a loadable student.

  --model DIR|HUB_ID   a diffusers Stable Diffusion pipeline folder (or a plain UNet folder) with weights, or a
                       hub id read from the local Hugging Face cache (default: model.teacher, else the toy teacher)
  --unet-config FILE   only a denoiser's config.json (alias --transformer-config): the architecture is built on the
                       meta device (no weights, seconds even at 12 B parameters) to plan a pruning and read its
                       parameter and MAC counts. The class comes from the config's `_class_name`
                       (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel,
                       PixArtTransformer2DModel; safeprune.backbones.known_denoisers). A bare name picks a shipped
                       public architecture (SHIPPED_CONFIGS: sd15, sd21, sdxl, sd3_medium, flux1_dev, pixart_alpha_1024).

The output folder holds `model/`, a complete diffusers pipeline folder with the student UNet and a model card
(see `safeprune.models.io`; a bare UNet folder when --model is a UNet folder without a pipeline), plus
`prune_report.json`: parameters, MACs of one UNet call and, when weights exist, the measured latency of one
call, before and after, and `config.yaml`. With `--unet-config` only `plan.json` and the report are written:
there is nothing to load. `--push-to-hub REPO` uploads model/ (safeprune.models.card.push_to_hub).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from safeprune.backbones import BACKBONES, denoiser_component
from safeprune.backbones.sd import CLIP_TOKENS
from safeprune.config import Config, save_config
from safeprune.data.datasets import encode_pool, open_image_captions
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError, check, choose
from safeprune.losses.denoising import DenoisingLoss
from safeprune.models import shipped  # looked up at call time: tests put another teacher in its place
from safeprune.models.io import (
    MODEL,
    check_supported_unet,
    is_hub_id,
    load_pipeline,
    load_plan,
    load_unet,
    pretrained_folder,
    write_model,
    write_unet,
)
from safeprune.pruning import METHODS, is_pruned, prune
from safeprune.pruning.measure import DEFAULT_RESOLUTION, count_macs, count_parameters, latency_ms
from safeprune.utils import atomic_folder, fingerprint, numpy_rng, resolve_device, seed_everything, torch_rng

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Public architecture configs shipped with safeprune (written from the hub repositories' config.json files).
SHIPPED_CONFIGS = {"sd15": "unet_configs/sd15.json", "sd21": "unet_configs/sd21.json", "sdxl": "unet_configs/sdxl.json",
                   "sd3_medium": "transformer_configs/sd3_medium.json",
                   "flux1_dev": "transformer_configs/flux1_dev.json",
                   "pixart_alpha_1024": "transformer_configs/pixart_alpha_1024.json"}


@dataclass(frozen=True)
class Source:
    """The UNet to prune and where it came from."""

    unet: torch.nn.Module
    weights: bool  # False: built on the meta device from --unet-config
    base_model: str | None  # the teacher's hub id (model card, safeprune.json); None = a local or the toy teacher
    pipeline_folder: Path | None  # where its VAE and text encoder live (taylor calibration)
    text_tokens: int  # the tokenizer's context length (cross-attention cost)
    label: str  # what was pruned, for the report


def run(cfg: Config, args=None) -> int:
    """CLI target of `safeprune prune` (its flags fill cfg.paths and cfg.model.teacher)."""
    out = prune_student(cfg)
    if getattr(args, "push_to_hub", None):
        from safeprune.models.card import push_to_hub

        check((out / MODEL / "model_index.json").is_file(), "--push-to-hub needs a pipeline model folder (prune a "
                                                            "pipeline with weights, not --unet-config)")
        print(f"pushed to {push_to_hub(out / MODEL, args.push_to_hub)}")
    return 0


def prune_student(cfg: Config) -> Path:
    """Prune cfg.model.teacher (or the UNet config at cfg.paths.unet_config) into cfg.paths.out; returns it."""
    from safeprune.runs import check_out

    check(bool(cfg.paths.out), "safeprune prune needs --out DIR (the student folder)")
    out = check_out(cfg.paths.out)
    check(not (out.exists() and any(out.iterdir())),
          f"output folder {str(out)!r} already exists and is not empty; pass a new path or delete it")
    check(not (cfg.model.teacher and cfg.paths.unet_config), "pass either --model or --unet-config, not both")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    source = _load_source(cfg, device)
    calib = None
    pruner = choose("pruning method", cfg.prune.method, METHODS)
    if source.weights and pruner.needs_calibration(cfg.prune):
        calib = taylor_calibration(cfg, source.pipeline_folder, cfg.paths.calib_data or None, device,
                                   pruner.calibration, pruner.calibration_sizes(cfg.prune))

    unet = source.unet
    # lineage: `finetune` checks that the teacher it distils from is this model (safeprune.utils.fingerprint)
    lineage = {"teacher_fingerprint": fingerprint(unet), "teacher": source.label} if source.weights else None
    before = _measure(unet, {}, cfg, source)
    student, plan = prune(unet, cfg.prune.method, cfg.prune, calib)
    after = _measure(student, plan, cfg, source)
    report = _report(cfg, plan, source, before, after)

    with atomic_folder(out) as tmp:
        if source.weights and source.pipeline_folder is not None:
            card = {"method": plan["method"], "prune_report": report, "concepts": [],
                    "title": f"{plan['method']}-pruned student (not fine-tuned)"}
            write_model(student, tmp / MODEL, plan, source.pipeline_folder, source.base_model, card)
        elif source.weights:  # a bare UNet folder was pruned: no pipeline components to ship with it
            write_unet(student, tmp / MODEL, plan, plan["base_config"], source.base_model)
        else:  # a plan for an architecture, not a model: no config.json, so nothing here looks loadable
            (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=1))
        if lineage:
            (tmp / "lineage.json").write_text(json.dumps(lineage, indent=1))
        save_config(cfg, tmp)
    print(json.dumps(report, indent=1))
    print(f"wrote {out}/ ({'model/: DiffusionPipeline.from_pretrained, safeprune.load_pipeline' if source.weights else 'plan only'})")
    return out


# ----------------------------------------------------------------------------- inputs


def _load_source(cfg: Config, device) -> Source:
    """--unet-config (meta device), --model (= model.teacher), or the shipped toy teacher."""
    if cfg.paths.unet_config:
        return _from_config(Path(cfg.paths.unet_config))
    model = cfg.model.teacher
    folder = pretrained_folder(model, cfg.model.revision, cfg.model.allow_download) if model else shipped.teacher_path()
    check(not (folder / "model_index.json").is_file() or denoiser_component(folder) is not None,
          f"--model {str(folder)!r} has no unet/ or transformer/; pass a diffusers pipeline folder")
    check(folder.is_dir(), f"--model {str(folder)!r} is not a folder; pass a diffusers Stable Diffusion folder")
    check(not is_pruned(load_plan(folder)), f"{str(folder)!r} is already pruned; prune its base model instead")
    is_pipeline = (folder / "model_index.json").is_file()
    pipeline = folder if is_pipeline else (folder.parent if (folder.parent / "model_index.json").is_file() else None)
    unet = load_unet(folder).to(device)
    check_supported_unet(unet.config, f"--model {str(folder)!r}", families=tuple(BACKBONES))
    # Only a hub id is recorded (model card, safeprune.json): the model folder carries copies of the other
    # components, and a local path would break when either folder moves.
    base_model = str(model) if model and is_hub_id(model) else None
    return Source(unet, True, base_model, pipeline, _text_tokens(pipeline, unet), str(folder))


def shipped_config(name: str) -> Path:
    """--unet-config: a path, or the bare name of a shipped public architecture (SHIPPED_CONFIGS)."""
    path = Path(name)
    if not path.exists() and name.removesuffix(".json") in SHIPPED_CONFIGS:
        return ASSETS / SHIPPED_CONFIGS[name.removesuffix(".json")]
    return path


def _from_config(path: Path) -> Source:
    from safeprune.backbones import known_denoisers
    from safeprune.pruning.measure import default_text_tokens, meta_model

    path = shipped_config(str(path))
    check(path.is_file(), f"--unet-config {str(path)!r} not found; pass a config.json or one of: "
                          f"{', '.join(SHIPPED_CONFIGS)}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--unet-config {str(path)!r} is not valid JSON ({err})") from err
    name = config.get("_class_name", "UNet2DConditionModel") if isinstance(config, dict) else None
    check(name in known_denoisers(), f"--unet-config {str(path)!r} is not a config of a supported denoiser "
                                     f"({', '.join(known_denoisers())})")
    # SDXL-style UNets are not refused here (check_supported_unet): a plan needs no pipeline inputs.
    try:
        model = meta_model(config)  # `_use_default_values` and other private keys are dropped: they would undo edits
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"--unet-config {str(path)!r} does not build a {name} ({type(err).__name__}: {err})") from err
    return Source(model, False, None, None, default_text_tokens(model), str(path))


def _text_tokens(pipeline: Path | None, denoiser) -> int:
    """The text tokens the denoiser attends to as its pipeline encodes them (MACs and latency depend on them):
    the CLIP tokenizer's context length; SD3 adds its T5 tokens, or as many zero tokens as CLIP ones without a T5
    (safeprune.backbones.sd3: SD3.sequence_length); T5-only families (Flux, PixArt) their pipelines' defaults."""
    from safeprune.backbones import family_key
    from safeprune.pruning.measure import default_text_tokens

    family = family_key(denoiser)
    if pipeline is None or family not in (None, "sd", "sdxl", "sd3"):
        return default_text_tokens(denoiser)
    config, clip = pipeline / "tokenizer" / "tokenizer_config.json", CLIP_TOKENS
    if config.is_file():
        length = json.loads(config.read_text()).get("model_max_length")
        if isinstance(length, int) and 0 < length < 100_000:
            clip = length
    if family != "sd3":
        return clip
    index = json.loads((pipeline / "model_index.json").read_text())
    has_t5 = bool((index.get("text_encoder_3") or [None])[0])
    return clip + (BACKBONES["sd3"].max_sequence_length if has_t5 else clip)


def taylor_calibration(cfg: Config, pipeline_folder: Path | None, calib_data: str | None, device,
                       output: str = "loss", sizes: tuple[int, int] | None = None):
    """calib(unet, i) -> denoising loss (eq. 1, plain MSE) of calibration batch i of the teacher's training data,
    or with output="prediction" the UNet's prediction on that batch (`depth`'s skip error).

    Data: `--calib-data` (an image folder with metadata.jsonl) or the toy world's `pretrain` split (what
    the toy teacher was trained on). Batch i depends only on (seed, "calibration", i).
    """
    from safeprune.sampling import backbone_of_pipe

    check(pipeline_folder is not None, f"{cfg.prune.method} calibration needs the model's VAE and text encoder: pass "
                                       "--model as a diffusers pipeline folder (model_index.json)")
    pipe = load_pipeline(pipeline_folder, device=device)
    backbone = backbone_of_pipe(pipe)
    batches, batch_size = sizes or (cfg.prune.channels.calibration_batches, cfg.prune.channels.calibration_batch_size)
    n = batches * batch_size
    size = backbone.latent_shape(pipe)[1] * pipe.vae_scale_factor
    data = open_image_captions(calib_data, world=ToyWorld(cfg.toyworld, cfg.seed), split="pretrain", n_toy=n, size=size)
    pool = encode_pool(data, n, pipe.vae, rng=numpy_rng(cfg.seed, "calibration"), device=device)
    texts = backbone.encode(pipe, pool.captions, device)  # one row per pool image
    # Diff-Pruning's Taylor score uses the plain loss (no Min-SNR weighting), in the family's prediction space
    loss_fn = DenoisingLoss(backbone.training_scheduler(pipe), snr_gamma=0.0, timestep_density=backbone.timestep_density)

    def calib(unet, i: int) -> torch.Tensor:
        gen = torch_rng(cfg.seed, "calibration", i)
        idx, latents = pool.draw(gen, batch_size)
        noise, t, x_t = loss_fn.schedule.noised(latents, gen, device)
        pred = backbone.predict(unet, x_t, t, texts[idx.to(device)])
        return pred if output == "prediction" else loss_fn(pred, latents, noise, t).mean()

    return calib


# ----------------------------------------------------------------------------- the report


def _measure(unet, plan: dict, cfg: Config, source: Source) -> dict:
    stored = count_parameters(unet)
    m = {"params": stored - int(plan.get("zeroed", 0)), "params_stored": stored, **count_macs(unet, source.text_tokens)}
    if source.weights:
        m["latency_ms"] = latency_ms(unet, cfg.prune.latency_batch, cfg.prune.latency_runs, source.text_tokens)
    return m


def _report(cfg: Config, plan: dict, source: Source, before: dict, after: dict) -> dict:
    report = {"method": plan["method"], "source": source.label, "weights": source.weights}
    report |= METHODS[plan["method"]].report(plan)
    for key in ("params", "macs", "macs_excl_attention", "latency_ms"):
        if key in before:
            report[f"{key}_before"], report[f"{key}_after"] = before[key], after[key]
            report[f"{key}_ratio"] = round(after[key] / before[key], 4)
    for key in ("latency_ms_before", "latency_ms_after"):
        if key in report:
            report[key] = round(report[key], 2)
    report["removed_share"] = round(1 - after["params"] / before["params"], 4)
    if after["params_stored"] != after["params"]:  # zeroed weights (magnitude) are still stored: dense kernels
        report["params_stored_after"] = after["params_stored"]
    if source.weights:
        report |= {"latency_batch": cfg.prune.latency_batch, "latency_runs": cfg.prune.latency_runs,
                   "device": str(next(source.unet.parameters()).device)}
    report["text_tokens"] = source.text_tokens
    # the latent side the MACs were counted at (Flux's config has none: its native 1024 px)
    report["latent_size"] = getattr(source.unet.config, "sample_size", None) or DEFAULT_RESOLUTION // 8
    return report
