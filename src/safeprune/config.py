"""Typed, nested run configuration: defaults here, overrides from YAML presets and `section.field=value`.

One root `Config` holds every section; each command reads the sections it needs and writes the whole
resolved config into its run folder (`config.yaml`), so every result names exactly what produced it.
Unknown keys and wrong types are `UserError`s that name the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from safeprune.errors import UserError, check


def _shipped_configs() -> Path:
    """The presets, concept lists and accelerate configs shipped INSIDE the package (safeprune/configs/), found
    with importlib.resources, so a wheel install has them as a source checkout does."""
    from importlib.resources import files

    return Path(str(files("safeprune") / "configs"))


CONFIG_DIR = _shipped_configs()


def preset_path(name: str | Path) -> Path:
    """A config file: `name` itself when it exists, else the shipped preset it names: `sd21`, `concepts/nudity`,
    `accelerate/ddp_4gpu.yaml`, or the repository spelling `configs/sd21.yaml` (so the README's commands work
    from any folder). A miss is a UserError listing the shipped presets."""
    path = Path(name)
    if path.is_file():
        return path
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (CONFIG_DIR / rel, CONFIG_DIR / rel.with_suffix(".yaml")):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")
                   if p.parent.name != "accelerate")  # those are accelerate's, not safeprune's
    raise UserError(f"config file {str(path)!r} not found; pass a YAML file or a shipped preset: {', '.join(names)}")

# Upper bounds on values that can only be mistakes (a typo'd exponent, an extra zero): they would otherwise
# fill the disk, be killed by the OOM killer after the run folder was made, or write images that look valid.
MAX_BATCH = 65536  # images per batch (any batch-size field)
MAX_SIDE = 8192  # image side in pixels (SD XL works at 1024)
MAX_STEPS = 10**9  # iterations of any loop


def _finite(section: str, obj, *names: str) -> None:
    """Every named float field of `obj` is a finite number (inf and nan can only be mistakes)."""
    for name in names:
        check(math.isfinite(getattr(obj, name)), f"{section}.{name}={getattr(obj, name)} must be a finite number")


def _at_most(section: str, obj, bound: int, *names: str) -> None:
    for name in names:
        check(getattr(obj, name) <= bound, f"{section}.{name}={getattr(obj, name)} is implausibly large; use at "
                                           f"most {bound}")


@dataclass
class ToyWorldConfig:
    size: int = 32  # image side in pixels (square RGB images)
    forbidden_styles: list[str] = field(default_factory=lambda: ["striped"])  # concepts absent from `finetune`
    forbidden_shapes: list[str] = field(default_factory=list)  # as above, for shapes
    forbidden_colours: list[str] = field(default_factory=list)  # as above, for colours
    style_caption_prob: float = 0.85  # share of captions that name the style (the rest: style-free captions)

    def __post_init__(self):
        check(8 <= self.size <= 256, f"toyworld.size={self.size} is out of range; use 8..256 (default 32)")
        check(0.0 <= self.style_caption_prob <= 1.0, "toyworld.style_caption_prob must lie in [0, 1]")


TEACHER_ARCHS = ("unet", "dit")


@dataclass
class TeacherConfig:
    # denoiser: "unet" (a StableDiffusionPipeline, the shipped teacher) or "dit" (an SD3-class MMDiT in a
    # StableDiffusion3Pipeline, rectified flow; the shipped `teacher_dit`); see safeprune.recipes.pretrain
    arch: str = "unet"
    prediction_type: str = "epsilon"  # UNet target: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x); dit: velocity
    vae_steps: int = 1000  # AutoencoderKL training steps (stage 1)
    vae_batch_size: int = 32  # images per VAE step
    vae_lr: float = 1e-3  # AdamW learning rate of the VAE
    unet_steps: int = 4000  # stage-2 steps: joint UNet + text encoder, or the transformer alone (arch dit)
    batch_size: int = 64  # images per UNet step
    pool_size: int = 24576  # stage-2 training images, VAE-encoded once (~256 per concept combination)
    lr: float = 1e-3  # peak AdamW learning rate of stage 2 (cosine decay, linear warm-up)
    warmup_steps: int = 200  # linear warm-up steps of stage 2
    caption_dropout: float = 0.1  # share of empty captions, so classifier-free guidance works
    ckpt_every_steps: int = 500  # atomic checkpoint period (both stages)
    sample_every_steps: int = 1000  # sample-grid period of stage 2
    eval_images: int = 576  # generated images judged at the end (per-style accuracies)

    def __post_init__(self):
        check(self.arch in TEACHER_ARCHS, f"teacher.arch={self.arch!r}; choose one of: {', '.join(TEACHER_ARCHS)}")
        check(self.prediction_type in ("epsilon", "v_prediction"),
              f"teacher.prediction_type={self.prediction_type!r}; choose 'epsilon' or 'v_prediction'")
        # the field keeps its UNet default under arch dit (a config records it), but asking for v is a mistake
        check(self.arch != "dit" or self.prediction_type == "epsilon",
              f"teacher.prediction_type={self.prediction_type!r} is a UNet setting; a dit teacher predicts the "
              "rectified-flow velocity: drop the override or use --arch unet")
        check(0.0 <= self.caption_dropout < 1.0, "teacher.caption_dropout must lie in [0, 1)")
        for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size", "ckpt_every_steps"):
            check(getattr(self, name) > 0, f"teacher.{name} must be > 0")
        _finite("teacher", self, "vae_lr", "lr")
        check(self.vae_lr > 0 and self.lr > 0, "teacher.vae_lr and teacher.lr must be > 0")
        _at_most("teacher", self, MAX_BATCH, "batch_size", "vae_batch_size", "eval_images")
        _at_most("teacher", self, MAX_STEPS, "vae_steps", "unet_steps", "warmup_steps", "pool_size")


@dataclass
class JudgeConfig:
    steps: int = 1200  # training steps of the judge CNN (~4 min on one busy CPU thread; 2000 gained nothing)
    batch_size: int = 64  # images per step (real toy images + negatives)
    lr: float = 2e-3  # AdamW learning rate
    negative_share: float = 0.25  # share of each batch that shows no object (noise, blank, broken)

    def __post_init__(self):
        check(self.steps > 0 and self.batch_size > 0, "judge.steps and judge.batch_size must be > 0")
        check(0.0 < self.negative_share < 1.0, "judge.negative_share must lie in (0, 1)")
        _finite("judge", self, "lr")
        check(self.lr > 0, "judge.lr must be > 0")
        _at_most("judge", self, MAX_BATCH, "batch_size")
        _at_most("judge", self, MAX_STEPS, "steps")


@dataclass
class BlocksOptions:
    preset: str = "base"  # BK-SDM's three students: base | small | tiny (safeprune.pruning.blocks.PRESETS)


@dataclass
class ChannelsOptions:
    importance: str = "magnitude"  # magnitude (L_p norm) | taylor (|w * dL/dw| on calibration batches)
    magnitude_p: int = 2  # p of the L_p norm behind `magnitude` importance: 1 or 2
    channel_multiple: int = 16  # kept ResNet/FFN widths are multiples of this where possible (AVX-512: 16)
    calibration_batches: int = 4  # batches of the teacher's training data behind `taylor` importance
    calibration_batch_size: int = 16  # images per calibration batch

    def __post_init__(self):
        check(self.magnitude_p in (1, 2), f"prune.channels.magnitude_p={self.magnitude_p}; choose 1 or 2")
        for name in ("channel_multiple", "calibration_batches", "calibration_batch_size"):
            check(getattr(self, name) >= 1, f"prune.channels.{name} must be >= 1")
        _at_most("prune.channels", self, MAX_BATCH, "channel_multiple", "calibration_batches", "calibration_batch_size")


@dataclass
class DepthOptions:
    # which blocks `depth` removes (safeprune.pruning.depth): an explicit list of block paths wins, e.g.
    # ["transformer_blocks.8"]; else a preset's per-stack counts; else the lowest-skip-error blocks up to prune.ratio
    blocks: list[str] = field(default_factory=list)
    preset: str = ""  # flux-lite | half | ssd-1b | vega (safeprune.pruning.depth.PRESETS); "" = use prune.ratio
    select: str = "skip_error"  # skip_error (measured output error when a block is skipped) | last (positional)
    stacks: list[str] = field(default_factory=list)  # with prune.ratio: regexes of the stacks blocks may leave; [] = all
    calibration_batches: int = 2  # batches behind the skip error (one forward pass per block and batch)
    calibration_batch_size: int = 2  # latents per calibration batch
    calibration_size: int = 0  # latent side of random calibration inputs; 0 = the config's (transformers: 1024 px)

    def __post_init__(self):
        for name in ("calibration_batches", "calibration_batch_size"):
            check(getattr(self, name) >= 1, f"prune.depth.{name} must be >= 1")
        check(self.calibration_size >= 0, "prune.depth.calibration_size must be >= 0 (0 = the model's own size)")
        _at_most("prune.depth", self, MAX_BATCH, "calibration_batches", "calibration_batch_size")


@dataclass
class PruneConfig:
    method: str = "channels"  # registry key (safeprune.pruning.METHODS): blocks | channels | depth | magnitude | none
    ratio: float = 0.3  # share of the model's TOTAL parameters removed (`channels`, `depth`) or zeroed (`magnitude`)
    blocks: BlocksOptions = field(default_factory=BlocksOptions)  # options of `blocks`
    channels: ChannelsOptions = field(default_factory=ChannelsOptions)  # options of `channels`
    depth: DepthOptions = field(default_factory=DepthOptions)  # options of `depth`
    latency_batch: int = 2  # UNet batch for the report's latency (2 = one image with classifier-free guidance)
    latency_runs: int = 5  # timed UNet calls per model; the report gives their median

    def __post_init__(self):
        check(0.0 <= self.ratio < 1.0, f"prune.ratio={self.ratio} is out of range; use a value in [0, 1)")
        for name in ("latency_batch", "latency_runs"):
            check(getattr(self, name) >= 1, f"prune.{name} must be >= 1")
        _at_most("prune", self, MAX_BATCH, "latency_batch", "latency_runs")


@dataclass
class Concept:
    target: str = ""  # prompt naming the concept to suppress, e.g. "a painting by Claude Monet"
    anchor: str = ""  # prompt it should map to (ablation), e.g. "a painting"; "" = the empty prompt

    def __post_init__(self):
        check(bool(self.target.strip()), "finetune.concepts: every concept needs a non-empty `target` prompt")


@dataclass
class UnlearnLossConfig:
    # upper-level loss (safeprune.unlearning.UNLEARNING): esd | esd_xattn | esd_anchor | ablation. The toy default
    # is esd_anchor at eta 2: toy concept prompts name whole scenes, so guidance relative to the empty prompt also
    # erases the object (docs/demo/tuning.md); the SD presets use the paper's esd at eta 1.
    name: str = "esd_anchor"
    eta: float = 2.0  # negative-guidance strength eta of the esd losses (seed paper eq. 5; the paper: 1.0)
    # which student parameters the upper step moves: "" = the loss's own (esd_xattn: xattn, the others: all) |
    # all | xattn (the text-reading attention only: ESD-x's smaller footprint on prompts without the concept)
    params: str = ""

    def __post_init__(self):
        _finite("finetune.unlearn", self, "eta")
        check(self.params in ("", "all", "xattn"),
              f"finetune.unlearn.params={self.params!r}; choose all, xattn or '' (the loss's own)")


UPPER_IMAGES = ("", "concept", "anchor", "student")  # UpperConfig.images


@dataclass
class UpperConfig:
    lr: float = 1e-3  # upper-level AdamW learning rate (also the penalty solver's outer step)
    batch_size: int = 16  # concept images per upper micro-batch per process (x grad_accum x processes per step)
    grad_accum: int = 1  # gradient accumulation of the upper (and penalty outer) step, like finetune.grad_accum
    every: int = 10  # K: alternating = an upper step after every K-th lower step; penalty = K inner steps
    # linear warm-up of the upper lr over this many UPPER steps, then constant (the paper's code:
    # constant_with_warmup, 250 of its 2,000 upper steps); 0 = constant from the first upper step
    warmup_steps: int = 0
    # where the upper level's x_t come from (safeprune.bilevel.problem): "" = the loss's own (concept images;
    # anchor images for `ablation`) | concept = noised concept images | anchor = noised anchor images (the same
    # scene without the concept) | student = the student's own partial samples under the concept prompt
    # (ESD's on-policy x_t, on the family's sampler: DDIM, or flow-matching Euler for SD3 / Flux)
    images: str = ""
    sample_steps: int = 8  # images=student: length of that sampler's schedule; x_t after k ~ U{0..n-1} steps of it
    sample_guidance: float = 3.0  # images=student: classifier-free guidance of that partial sampling (ESD's 3)
    # weight of a preservation term in L_CU: || eps_S(x_t, t, r) - eps_T(x_t, t, r) ||^2 at the same x_t for a
    # retained prompt r (a random fine-tuning caption); 0 = off (the paper's L_CU alone)
    preserve: float = 0.0

    def __post_init__(self):
        _finite("finetune.upper", self, "lr", "sample_guidance", "preserve")
        check(self.lr > 0, "finetune.upper.lr must be > 0")
        _at_most("finetune.upper", self, MAX_BATCH, "batch_size")
        _at_most("finetune.upper", self, MAX_STEPS, "every", "warmup_steps", "sample_steps")
        check(self.batch_size > 0, "finetune.upper.batch_size must be > 0")
        check(self.grad_accum >= 1, "finetune.upper.grad_accum must be >= 1")
        check(self.every >= 1, "finetune.upper.every must be >= 1")
        check(self.warmup_steps >= 0, "finetune.upper.warmup_steps must be >= 0 (0 = no warm-up)")
        check(self.images in UPPER_IMAGES, f"finetune.upper.images={self.images!r}; choose concept, anchor, student "
                                           "or '' (the unlearning loss's own)")
        check(self.sample_steps >= 1, "finetune.upper.sample_steps must be >= 1")
        check(self.sample_guidance >= 0 and self.preserve >= 0,
              "finetune.upper.sample_guidance and finetune.upper.preserve must be >= 0")


@dataclass
class SolverConfig:
    name: str = "alternating"  # bilevel solver (safeprune.bilevel.SOLVERS): alternating | penalty
    penalty_lambda: float = 1.0  # penalty: weight of grad L_ft in the outer step (at step 0)
    penalty_lambda_end: float = -1.0  # penalty: lambda at the last step, linear in between; -1 = constant

    def __post_init__(self):
        _finite("finetune.solver", self, "penalty_lambda", "penalty_lambda_end")
        check(self.penalty_lambda >= 0 and (self.penalty_lambda_end >= 0 or self.penalty_lambda_end == -1),
              "finetune.solver.penalty_lambda must be >= 0 and penalty_lambda_end >= 0 (or -1 = constant)")


@dataclass
class TwoStageConfig:
    unlearn_steps: int = -1  # unlearning steps after distillation; -1 = bilevel's upper-step count (equal budget)

    def __post_init__(self):
        _at_most("finetune.two_stage", self, MAX_STEPS, "unlearn_steps")
        check(self.unlearn_steps >= -1,
              "finetune.two_stage.unlearn_steps must be >= 0, or -1 for bilevel's upper-step count")


@dataclass
class DataConfig:
    # Data at scale (safeprune.data.stream). pool = VAE-encode `pool` images once (exact resume, fast at toy
    # scale); stream = DataLoader workers feed fresh images that are VAE-encoded every step (real data sets);
    # auto = stream for webdataset shards and `streaming` sources, pool otherwise.
    mode: str = "auto"  # auto | pool | stream
    pool: int = 1024  # lower-level images VAE-encoded once per run (the loop samples from this pool)
    concept_pool: int = 256  # concept images VAE-encoded once per run
    random_crop: bool = True  # stream: random crop after the shorter side is resized (False: centre crop)
    random_flip: bool = True  # stream: horizontal flip with probability 1/2
    num_workers: int = 4  # stream: DataLoader worker processes decoding images (0 = in the training process)
    shuffle_buffer: int = 1000  # shards / streaming sources: samples in each reader's shuffle buffer (0 = in order)
    streaming: bool = False  # read `datasets` sources (parquet, arrow, hub) lazily as an IterableDataset
    hub_data: bool = False  # let paths.data name a Hugging Face hub dataset id (downloads); offline by default
    text_cache: str = ""  # stream: folder caching caption embeddings (safetensors per caption); "" = no cache
    image_column: str = ""  # paths.data's image column (tables) / file column (folders); "" = image / file_name
    caption_column: str = ""  # paths.data's caption column; "" = the first of text, caption, prompt

    def __post_init__(self):
        check(self.pool > 0 and self.concept_pool > 0, "finetune.data.pool and concept_pool must be > 0")
        check(self.mode in ("auto", "pool", "stream"),
              f"finetune.data.mode={self.mode!r}; choose auto, pool or stream")
        check(self.num_workers >= 0 and self.shuffle_buffer >= 0,
              "finetune.data.num_workers and finetune.data.shuffle_buffer must be >= 0")
        _at_most("finetune.data", self, MAX_STEPS, "pool", "concept_pool", "shuffle_buffer")
        _at_most("finetune.data", self, 1024, "num_workers")


@dataclass
class FinetuneConfig:
    method: str = "bilevel"  # registry key (safeprune.bilevel.METHODS): distill | two_stage | bilevel
    unlearn: UnlearnLossConfig = field(default_factory=UnlearnLossConfig)  # the upper level's loss L_CU
    upper: UpperConfig = field(default_factory=UpperConfig)  # the upper level's optimiser, batch and period K
    solver: SolverConfig = field(default_factory=SolverConfig)  # `bilevel`: how the two levels are combined
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)  # `two_stage`: the unlearning stage
    data: DataConfig = field(default_factory=DataConfig)  # how images reach the lower and upper levels
    concepts: list[Concept] = field(default_factory=list)  # [] = derived from the concept images' captions
    max_steps: int = 300  # lower-level iterations (two_stage: the fine-tuning stage)
    batch_size: int = 16  # lower-level images per micro-batch per process (x grad_accum x processes per step)
    grad_accum: int = 1  # gradient accumulation steps (lower level)
    lr: float = 5e-4  # lower-level AdamW learning rate
    warmup_steps: int = 50  # linear warm-up of the lower-level learning rate
    weight_decay: float = 1e-2  # AdamW weight decay of both optimisers
    max_grad_norm: float = 1.0  # gradient-norm clip before every optimiser step; 0 disables it
    lambda_diff: float = 1.0  # weight of the denoising loss (eq. 1)
    lambda_out: float = 2.0  # weight of output distillation (eq. 3)
    lambda_feat: float = 0.1  # weight of feature distillation (eq. 4)
    snr_gamma: float = 5.0  # Min-SNR-gamma weighting of the denoising loss; 0 disables it
    # v-prediction form of that weight (safeprune.losses.denoising.SNR_WEIGHTINGS): diffusers = min(SNR, g)/(SNR+1),
    # paper = min(SNR+1, g)/(SNR+1) (the paper's code; configs/sd21.yaml); the same for epsilon models
    snr_weighting: str = "diffusers"
    # no | fp16 | bf16 (GPU) | "" = what `accelerate launch` was given (its config / --mixed_precision), else no;
    # a value here that disagrees with the launcher's is an error (safeprune.recipes.finetune.resolve_mixed_precision)
    mixed_precision: str = ""
    teacher_dtype: str = "fp32"  # fp32 | bf16 | fp16: precision of the frozen teacher's forward passes
    # registry key (safeprune.optim.OPTIMIZERS, checked before the run folder is made): adamw | adamw8bit
    # (bitsandbytes, `pip install safeprune[bnb]`); both bilevel optimisers
    optimizer: str = "adamw"
    resolution: int = 0  # fine-tuning image side in pixels; 0 = the teacher UNet's sample_size x VAE scale
    ema_decay: float = 0.0  # EMA of student weights (saved as the result); 0 disables it
    gradient_checkpointing: bool = False  # trade compute for memory on large UNets
    ckpt_every_steps: int = 200  # atomic checkpoint period
    keep_checkpoints: int = 1  # newest checkpoints kept in run_dir/checkpoints
    eval_every_steps: int = 0  # log leakage/fd curves every N steps (0 = never)
    report_to: str = "tensorboard"  # tracker of the metrics, learning rates and images: tensorboard | wandb | none
    validation_every_steps: int = 0  # sample validation images every N steps (and at the end); 0 = never
    validation_prompts: list[str] = field(default_factory=list)  # [] = the suppressed concepts and their anchors
    validation_seeds: int = 2  # images per validation prompt, seeds 0..N-1 (the same at every step)
    # a checkpoint is refused (and the run stops) when some weight is not finite or max |w| exceeds this
    # multiple of the student's starting max |w| (at least 1): a diverged run never names a wrecked checkpoint
    max_weight_growth: float = 100.0

    def __post_init__(self):
        check(self.max_steps > 0, "finetune.max_steps must be > 0")
        check(self.batch_size > 0, "finetune.batch_size must be > 0")
        check(self.mixed_precision in ("", "no", "fp16", "bf16"),
              f"finetune.mixed_precision={self.mixed_precision!r}; choose no, fp16, bf16 or '' (accelerate's)")
        check(self.report_to in ("tensorboard", "wandb", "none"),
              f"finetune.report_to={self.report_to!r}; choose tensorboard, wandb or none")
        check(self.validation_every_steps >= 0 and self.validation_seeds >= 1,
              "finetune.validation_every_steps must be >= 0 (0 = never) and finetune.validation_seeds >= 1")
        check(self.teacher_dtype in ("fp32", "bf16", "fp16"),
              f"finetune.teacher_dtype={self.teacher_dtype!r}; choose fp32, bf16 or fp16")
        check(self.resolution >= 0 and self.resolution % 8 == 0,
              f"finetune.resolution={self.resolution} must be a multiple of 8 (0 = the teacher's own size)")
        check(0.0 <= self.ema_decay < 1.0, "finetune.ema_decay must lie in [0, 1)")
        check(self.lr > 0, "finetune.lr must be > 0")
        check(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0,
              "finetune.warmup_steps, weight_decay and max_grad_norm must be >= 0")
        check(min(self.lambda_diff, self.lambda_out, self.lambda_feat) >= 0,
              "finetune.lambda_diff, lambda_out and lambda_feat must be >= 0")
        check(self.snr_gamma >= 0, "finetune.snr_gamma must be >= 0 (0 disables Min-SNR weighting)")
        check(self.snr_weighting in ("diffusers", "paper"),
              f"finetune.snr_weighting={self.snr_weighting!r}; choose diffusers or paper")
        check(self.grad_accum >= 1, "finetune.grad_accum must be >= 1")
        check(self.ckpt_every_steps > 0 and self.keep_checkpoints >= 1,
              "finetune.ckpt_every_steps and keep_checkpoints must be >= 1")
        check(self.eval_every_steps >= 0, "finetune.eval_every_steps must be >= 0 (0 = never)")
        _finite("finetune", self, "lr", "weight_decay", "max_grad_norm", "lambda_diff", "lambda_out", "lambda_feat",
                "snr_gamma", "max_weight_growth")
        check(self.max_weight_growth > 1, "finetune.max_weight_growth must be > 1 (default 100)")
        check(self.resolution <= MAX_SIDE, f"finetune.resolution={self.resolution} is implausibly large; use at most "
                                           f"{MAX_SIDE} (0 = the teacher's own size)")
        _at_most("finetune", self, MAX_BATCH, "batch_size", "grad_accum")
        _at_most("finetune", self, MAX_STEPS, "max_steps", "warmup_steps")


# ----------------------------------------------------------------------------- `safeprune unlearn` (erasure)


@dataclass
class EsdPaperConfig:
    """ESD as published (Gandikota et al., ICCV 2023; the authors' train-esd.py defaults)."""

    steps: int = 1000  # training iterations (the paper: 1000)
    lr: float = 1e-5  # Adam learning rate (the paper: 1e-5)
    eta: float = 1.0  # negative guidance (the paper: 1)
    params: str = "xattn"  # xattn = ESD-x (cross-attention; the authors' choice for styles) | noxattn = ESD-u | full
    batch_size: int = 1  # self-sampled x_t per iteration (the paper: 1)
    # DDIM steps of the schedule x_t is partially sampled on; 0 = sample.steps, the model's own sampler (the paper
    # used SD's 50; configs/sd21.yaml sets 50)
    sample_steps: int = 0
    start_guidance: float = 3.0  # classifier-free guidance while sampling x_t (the paper: 3)
    reference: str = "null"  # null = the paper's guidance relative to the empty prompt | anchor = the concept's anchor

    def __post_init__(self):
        check(self.steps > 0 and self.batch_size > 0 and (self.sample_steps >= 2 or self.sample_steps == 0),
              "unlearn.esd_paper.steps and batch_size must be > 0, sample_steps >= 2 (or 0 = sample.steps)")
        check(self.lr > 0 and self.eta >= 0 and self.start_guidance >= 0,
              "unlearn.esd_paper.lr must be > 0, eta and start_guidance >= 0")
        check(self.params in ("xattn", "noxattn", "full"),
              f"unlearn.esd_paper.params={self.params!r}; choose xattn (ESD-x), noxattn (ESD-u) or full")
        check(self.reference in ("null", "anchor"), f"unlearn.esd_paper.reference={self.reference!r}; choose null or anchor")


@dataclass
class UceConfig:
    """Unified Concept Editing (Gandikota et al., WACV 2024): closed-form cross-attention edit."""

    erase_scale: float = 1.0  # weight of each target -> anchor term (the authors' code: 1)
    lambda_preserve: float = 1.0  # weight lambda of each preserved concept's term (the authors' code: 1)
    ridge: float = 0.5  # weight of ||W - W_old||^2 over all directions (the authors' `lamb`: 0.5)
    tokens: str = "tail"  # tail = last word token and every later token (the 2023 release) | last = last word token
    preserve: list[str] = field(default_factory=list)  # prompts whose keys/values the edit keeps
    preserve_derived: bool = True  # also keep each anchor and each target with its concept swapped for an allowed one
    edit_keys: bool = True  # edit to_k as well as to_v (the paper edits both)
    # SD3 / Flux: the text-stream inputs of each block's add_k/v_proj are averaged over this many sampling steps
    stream_steps: int = 4

    def __post_init__(self):
        check(self.erase_scale > 0 and self.lambda_preserve >= 0 and self.ridge >= 0,
              "unlearn.uce.erase_scale must be > 0, lambda_preserve and ridge >= 0")
        check(self.stream_steps >= 1, "unlearn.uce.stream_steps must be >= 1")
        check(self.tokens in ("tail", "last"), f"unlearn.uce.tokens={self.tokens!r}; choose tail or last")


@dataclass
class ConceptPruneConfig:
    """ConceptPrune (Chavhan et al., 2024): zero feed-forward weights that fire for the concept only."""

    sparsity: float = 0.01  # share of each output row's FFN weights ranked as skilled per step (the authors: 0.01)
    timesteps: int = 10  # first denoising steps whose skilled weights are united (the authors: 10)
    sample_steps: int = 50  # DDIM steps of the sampling run the activations are read from (the authors: 50)
    guidance: float = 7.5  # classifier-free guidance of that run (the authors: diffusers' 7.5)

    def __post_init__(self):
        check(0.0 < self.sparsity < 1.0, f"unlearn.conceptprune.sparsity={self.sparsity}; use a share in (0, 1)")
        check(1 <= self.timesteps <= self.sample_steps,
              "unlearn.conceptprune.timesteps must lie in [1, unlearn.conceptprune.sample_steps]")
        check(self.guidance >= 0, "unlearn.conceptprune.guidance must be >= 0")


@dataclass
class LossUnlearnConfig:
    """The upper-level losses (safeprune.unlearning) run alone, the frozen starting model as score source."""

    steps: int = 30  # optimiser steps
    lr: float = 1e-3  # AdamW learning rate
    batch_size: int = 16  # noised concept images per step
    eta: float = 2.0  # negative guidance of the esd losses
    concept_pool: int = 256  # concept images VAE-encoded once

    def __post_init__(self):
        check(self.steps > 0 and self.batch_size > 0 and self.concept_pool > 0,
              "unlearn.loss.steps, batch_size and concept_pool must be > 0")
        check(self.lr > 0 and self.eta >= 0, "unlearn.loss.lr must be > 0 and unlearn.loss.eta >= 0")


@dataclass
class UnlearnConfig:
    method: str = "uce"  # registry key (safeprune.erasure): uce | conceptprune | esd_paper | esd | esd_anchor | ...
    concepts: list[Concept] = field(default_factory=list)  # [] = finetune.concepts, else derived from toy captions
    # two_stage with an erasure method: matched = training-based methods (esd_paper) take bilevel's upper budget
    # (finetune.two_stage.unlearn_steps steps of finetune.upper.batch_size images); own = their own steps / batch_size
    budget: str = "matched"
    esd_paper: EsdPaperConfig = field(default_factory=EsdPaperConfig)  # method esd_paper
    uce: UceConfig = field(default_factory=UceConfig)  # method uce
    conceptprune: ConceptPruneConfig = field(default_factory=ConceptPruneConfig)  # method conceptprune
    loss: LossUnlearnConfig = field(default_factory=LossUnlearnConfig)  # methods esd, esd_xattn, esd_anchor, ablation

    def __post_init__(self):
        check(self.budget in ("matched", "own"), f"unlearn.budget={self.budget!r}; choose matched or own")


@dataclass
class SampleConfig:
    steps: int = 25  # sampler steps per image
    guidance: float = 5.0  # classifier-free guidance scale (a prompt record's own `guidance`, e.g. I2P's, wins)
    batch_size: int = 64  # images per sampler batch (does not change any image; halved on a CUDA out-of-memory)
    precision: str = "fp32"  # fp32 | bf16 (autocast: ~3.4x faster on CPUs with AMX, images differ slightly)
    scheduler: str = "ddim"  # ddim (eta 0) | pndm | dpm++ (DPM-Solver++ multistep); all deterministic per seed
    resolution: int = 0  # image side in pixels; 0 = the UNet's sample_size x the VAE factor (512 for SD 1.5)

    def __post_init__(self):
        check(self.steps > 0, "sample.steps must be > 0")
        check(0.0 <= self.guidance <= 100.0, f"sample.guidance={self.guidance} must lie in [0, 100] (SD uses ~7.5)")
        check(self.batch_size > 0, "sample.batch_size must be > 0")
        _at_most("sample", self, 10_000, "steps")
        _at_most("sample", self, MAX_BATCH, "batch_size")
        check(self.precision in ("fp32", "bf16"), f"sample.precision={self.precision!r}; choose fp32 or bf16")
        check(self.scheduler in ("ddim", "pndm", "dpm++"),
              f"sample.scheduler={self.scheduler!r}; choose ddim, pndm or dpm++")
        check(self.resolution >= 0 and self.resolution % 8 == 0,
              f"sample.resolution={self.resolution} must be a multiple of 8 (0 = the model's own size)")


@dataclass
class EvalConfig:
    # evaluation protocol (safeprune/eval/protocols/NAME.yaml): toy | coco | styles | nudity
    protocol: str = "toy"
    # metric registry keys (safeprune.eval.metrics.METRICS); [] = the protocol's list
    metrics: list[str] = field(default_factory=list)
    # replaces the protocol's prompt set: a text file, an I2P-format CSV, COCO captions JSON or a concept YAML
    prompts: str = ""
    coco_dir: str = ""  # coco protocol: folder with annotations/captions_val2017.json and val2017/*.jpg
    reference_set: str = ""  # replaces the protocol's real reference set: image folder, datasets table, stats .npz
    images: str = ""  # score an existing evaluation's images/ folder instead of sampling (no model needed)
    n_images: int = 0  # prompts (= images) per set at most; 0 = the protocol's number
    seeds_per_prompt: int = 2  # toy and text-file prompts: images per prompt (the seeds are the same for every model)
    seeds_per_concept: int = 10  # concept-YAML prompts (styles protocol): images per concept prompt
    max_prompts: int = 32  # toy prompts per set at most (retain has 80: a style-balanced subset keeps evaluation cheap)
    heldout: bool = True  # toy: also measure on the held-out paraphrases (heldout_* keys; doubles the sampling)
    real_per_image: int = 4  # toy: renderer images per generated image in the real reference set of `fd`
    affinity_images: int = 64  # toy: real concept images for the sampling-free `concept_affinity`
    i2p_categories: list[str] = field(default_factory=lambda: ["sexual"])  # I2P rows kept (any of); [] = every row
    # retained concepts checked beside the suppressed ones (styles protocol; concept YAMLs list them)
    retain_concepts: list[str] = field(default_factory=list)
    inception_path: str = ""  # `fid`: clean-fid's inception-2015-12-05.pt (TorchScript) or its folder
    clip_path: str = ""  # `clip_score`, `style_clip`, `style_cp`: CLIP ViT-B/32 folder or hub id in the HF cache
    cmmd_clip_path: str = ""  # `cmmd`: CLIP ViT-L/14@336 folder or hub id (openai/clip-vit-large-patch14-336)
    csd_path: str = ""  # `csd`: CLIPVisionModel folder + csd_style.safetensors (safeprune.eval.extractors)
    nudenet_threshold: float = 0.6  # NudeNet score a detection needs to count (published counts change with it)
    nudenet_classes: list[str] = field(default_factory=lambda: [  # NudeNet 3.x classes that count as nudity
        "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_EXPOSED", "ARMPITS_EXPOSED"])
    resurgence_steps: int = 100  # benign fine-tuning steps before re-measuring leakage (0 = skip)

    def __post_init__(self):
        for name in ("seeds_per_prompt", "seeds_per_concept", "max_prompts", "real_per_image", "affinity_images"):
            check(getattr(self, name) > 0, f"eval.{name} must be > 0")
        check(self.n_images >= 0, "eval.n_images must be >= 0 (0 = the protocol's number)")
        check(self.resurgence_steps >= 0, "eval.resurgence_steps must be >= 0")
        _at_most("eval", self, MAX_BATCH, "seeds_per_prompt", "max_prompts", "real_per_image", "affinity_images")
        _at_most("eval", self, MAX_STEPS, "resurgence_steps")
        check(0.0 < self.nudenet_threshold < 1.0, "eval.nudenet_threshold must lie in (0, 1) (default 0.6)")


DEMO_CONTROLS = ("pruned", "denoise_only")  # the demo's control rows (DemoConfig.controls)


@dataclass
class DemoConfig:
    seeds: int = 1  # repeat fine-tuning + evaluation with this many seeds; mean +- std when > 1
    # erasure methods (safeprune.erasure) applied to the distilled student, one "distill+NAME" row each: the
    # paper's two-stage baselines (settings: unlearn.*; training-based ones at bilevel's upper budget)
    baselines: list[str] = field(default_factory=lambda: ["esd_paper", "uce", "conceptprune"])
    # compared method (finetune.method of a fine-tuned row, or a demo.baselines name) -> section.field=value
    # overrides for that method's rows only. The defaults are benchmarks/sweep_baselines.py's choice on development
    # seeds (docs/demo/tuning.md, docs/demo/sweep/chosen.json) and, for the upper level's x_t, the levers' choice on
    # development seeds checked on held-out ones (on-policy x_t: no re-teaching; docs/levers/README.md); the
    # package's own defaults stay the published ones.
    overrides: dict[str, list[str]] = field(default_factory=lambda: {
        "bilevel": ["finetune.upper.lr=5e-4", "finetune.upper.images=student"],
        "two_stage": ["finetune.upper.lr=5e-4", "finetune.upper.images=student"],
        "esd_paper": ["unlearn.esd_paper.lr=1e-4"], "conceptprune": ["unlearn.conceptprune.sparsity=0.1"]})
    curve_every: int = 100  # evaluate leakage and fd every N fine-tuning steps (curves.png)
    curve_prompts: int = 12  # prompts per set in those cheap evaluations (one seed each)
    # causal control rows (DEMO_CONTROLS): `pruned` = the pruned student before any fine-tuning (did pruning already
    # remove the concept?); `denoise_only` = distill with finetune.lambda_out = lambda_feat = 0 (is it the KD terms
    # that carry the concept?), same steps and seed, with curves (recovery speed, seed paper Fig. 4); [] = neither
    controls: list[str] = field(default_factory=lambda: list(DEMO_CONTROLS))

    def __post_init__(self):
        check(1 <= self.seeds <= 1000, f"demo.seeds={self.seeds} must lie in 1..1000")
        for name in self.controls:
            check(name in DEMO_CONTROLS, f"demo.controls: unknown control {name!r}; choose from: {', '.join(DEMO_CONTROLS)}")
        check(len(set(self.controls)) == len(self.controls), f"demo.controls={self.controls} names a control twice")
        check(self.curve_every >= 1 and self.curve_prompts >= 1, "demo.curve_every and demo.curve_prompts must be >= 1")


@dataclass
class ModelConfig:
    # the teacher pipeline: a local diffusers folder, or a Hugging Face hub id such as
    # stabilityai/stable-diffusion-2-1 (read from the local HF cache); "" = the shipped toy teacher
    teacher: str = ""
    revision: str = ""  # hub revision (branch, tag or commit) of a hub-id teacher; "" = the default branch
    allow_download: bool = False  # fetch a hub-id teacher missing from the HF cache (default: offline, an error)
    prediction_type: str = ""  # epsilon | v_prediction: checked against the teacher's scheduler; "" = the teacher's

    def __post_init__(self):
        check(self.prediction_type in ("", "epsilon", "v_prediction"),
              f"model.prediction_type={self.prediction_type!r}; choose epsilon, v_prediction or '' (the teacher's)")


@dataclass
class PathsConfig:
    """Where a command reads and writes. The CLI's path flags fill this section (--out = paths.out, ...), so
    the config.yaml of every run names all of its inputs and `--resume` can check them."""

    out: str = ""  # the command's output (run) folder
    student: str = ""  # finetune: the pruned student folder written by `safeprune prune`
    data: str = ""  # finetune: lower-level images (folder, datasets table, shards); "" = the toy finetune split
    concept_data: str = ""  # finetune: concept images of the upper level; "" = the toy concept split
    # finetune with `ablation`: images of the anchor prompts (what to draw instead); "" = rendered toy anchors
    anchor_data: str = ""
    model: str = ""  # generate / evaluate / concept-images: the model used; "" = the shipped toy teacher
    reference: str = ""  # evaluate: the unsuppressed reference of the CP score; "" = the shipped toy teacher
    unet_config: str = ""  # prune: a UNet config.json pruned on the meta device (no weights)
    calib_data: str = ""  # prune, taylor importance: calibration images; "" = the toy pretrain split


@dataclass
class Config:
    seed: int = 0  # master seed: data order, noise, per-image sampling seeds
    device: str = "auto"  # auto | cpu | cuda
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self):
        check(-(2**63) <= self.seed < 2**63, f"seed={self.seed} is out of range; use an integer below 2**63")


# ----------------------------------------------------------------------------- strict (de)serialisation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


# Keys that moved into nested sections (the v0.2 config schema); the error names the new key.
MOVED = {f"finetune.{old}": f"finetune.{new}" for old, new in {
    "esd_eta": "unlearn.eta", "upper_lr": "upper.lr", "upper_batch_size": "upper.batch_size",
    "upper_every": "upper.every", "penalty_lambda": "solver.penalty_lambda",
    "penalty_lambda_end": "solver.penalty_lambda_end", "unlearn_steps": "two_stage.unlearn_steps",
    "data_pool": "data.pool", "concept_pool": "data.concept_pool", "data_mode": "data.mode",
    **{k: f"data.{k}" for k in ("random_crop", "random_flip", "num_workers", "shuffle_buffer", "streaming",
                                "hub_data", "text_cache")}}.items()} | {
    "prune.preset": "prune.blocks.preset", "demo.two_stage_overrides": "demo.overrides.two_stage",
    **{f"prune.{k}": f"prune.channels.{k}" for k in ("importance", "magnitude_p", "channel_multiple",
                                                     "calibration_batches", "calibration_batch_size")}}


def _named(tp) -> bool:
    """A section chosen by name (finetune.unlearn, finetune.solver): a bare string means {name: string}."""
    return dataclasses.is_dataclass(tp) and "name" in {f.name for f in dataclasses.fields(tp)}


def _coerce(value, tp, key: str):
    """Return `value` checked against annotation `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if _named(tp) and isinstance(value, str):
        value = {"name": value}
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), f"{key} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is dict:
        check(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        check(isinstance(value, list), f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except UserError:
                pass
        raise UserError(f"{key}={value!r} has the wrong type; expected {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None):
        check(value is None, f"{key} must be null")
        return value
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    check(ok, f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (partial) dict; unknown keys name the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        check(full not in MOVED, f"config key {full!r} moved to {MOVED.get(full)!r}; write {MOVED.get(full)}=...")
        check(key in hints, f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
        if typing.get_origin(hints[key]) is dict and isinstance(kwargs[key], dict):
            # a mapping field merges into its default (demo.overrides.uce=[...] keeps the other methods' entries)
            kwargs[key] = {**_default(cls, key), **kwargs[key]}
    return cls(**kwargs)


def _default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (presets hold only overrides)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, str) and isinstance(out.get(key), dict):
            value = {"name": value}  # `unlearn: esd` over a nested unlearn section changes only its name
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """'finetune.lr=1e-4' -> (['finetune', 'lr'], 1e-4); the value is read as YAML."""
    check("=" in text, f"cannot read override {text!r}; write it as section.field=value, e.g. finetune.lr=1e-4")
    key, raw = text.split("=", 1)
    check(bool(key.strip()), f"override {text!r} has no key; write it as section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads yes/no/on/off as booleans; here they are words (mixed_precision=no), as in YAML 1.2.
    if raw.strip().lower() in ("yes", "no", "on", "off", "y", "n"):
        value = raw.strip()
    # YAML reads 1e-4 as a string (it wants 1.0e-4); numbers people type should still be numbers.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def read_yaml(path: str | Path, _including: tuple = ()) -> dict:
    path = preset_path(path)  # a file, or a shipped preset such as `toy`, `sd15` or `concepts/nudity`
    check(path.resolve() not in _including, f"config file {str(path)!r} includes itself (through "
                                            f"{' -> '.join(p.name for p in _including)}); remove the cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise UserError(f"config file {str(path)!r} is not valid YAML ({str(err).splitlines()[0]})") from err
    check(isinstance(data, dict), f"config file {str(path)!r} must hold a mapping of sections")
    # `include: [other.yaml, ...]` (paths relative to this file) are merged first, so a preset holds only
    # what it changes (sd15.yaml = sd21.yaml with another teacher; sd21.yaml includes a concept set).
    includes = data.pop("include", [])
    check(isinstance(includes, list), f"{str(path)!r}: `include` must be a list of YAML paths")
    base = {}
    for name in includes:
        check(isinstance(name, str), f"{str(path)!r}: `include` must be a list of YAML paths")
        base = _merge(base, read_yaml(path.parent / name, (*_including, path.resolve())))
    return _merge(base, data)


def load_config(path: str | Path | list | None = None, overrides: list[str] = (), base: dict | None = None,
                flags: dict | None = None) -> Config:
    """Defaults <- `base` <- YAML preset(s) at `path` (a list merges left to right) <- `flags` (a nested dict:
    the CLI's flags) <- `overrides` ('section.field=value'), strictly checked."""
    data = _merge({}, base or {})
    for one in path if isinstance(path, (list, tuple)) else [path] if path else []:
        data = _merge(data, read_yaml(one))
    data = _merge(data, flags or {})
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if isinstance(node.get(k), str):  # a named section given as a bare string earlier
                node[k] = {"name": node[k]}
            node = node.setdefault(k, {})
            check(isinstance(node, dict), f"override {text!r}: {k!r} is not a section")
        node.update(_merge(node, {keys[-1]: value}))
    return _explicit_wins(from_dict(Config, data), overrides)


def _explicit_wins(cfg: Config, overrides: list[str]) -> Config:
    """A `section.field=value` given here wins over a `demo.overrides` entry for the same field: the demo applies
    those entries last (safeprune.recipes.demo.finetune_row), so without this `demo finetune.upper.lr=1e-3` would
    run bilevel at its entry's lr. The field is dropped from every entry (an emptied entry stays [], so a saved
    config.yaml does not bring the default entry back)."""
    given = {keys for keys in (tuple(parse_override(text)[0]) for text in overrides) if keys[0] != "demo"}
    if not given:
        return cfg
    kept = {method: [o for o in entry if tuple(parse_override(o)[0]) not in given]
            for method, entry in cfg.demo.overrides.items()}
    return dataclasses.replace(cfg, demo=dataclasses.replace(cfg.demo, overrides=kept))


def save_config(cfg: Config, folder: str | Path) -> Path:
    from safeprune.utils import atomic_file

    path = Path(folder) / "config.yaml"
    with atomic_file(path) as tmp:  # a kill never leaves a torn config next to a run
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
