"""Peak training memory of `safeprune finetune`, estimated before launch (per process / GPU).

What a run keeps, and how each part is counted (bytes):
  persistent   student weights (fp32: Accelerate's mixed precision keeps fp32 masters) + gradients of the
               trained weights (fp32) + optimiser states of BOTH bilevel optimisers (lower: every weight;
               upper: the unlearning loss's parameter set; the `state_bytes` of the safeprune.optim entry
               per parameter: 8 for AdamW, 2 for 8-bit AdamW) + the frozen teacher in `finetune.teacher_dtype` + the
               latent pools (mean and std per image, fp32) and the prompt-embedding table (fp32);
               with several processes DDP adds its gradient buckets (one more fp32 gradient copy).
  activations  MEASURED, not modelled: the student runs once on the meta device (no memory, no compute) at
               the run's batch and latent size under `torch.autograd.graph.saved_tensors_hooks`, which
               sees every tensor autograd keeps for the backward pass; weights are excluded and views
               count once (by their base). Attention is counted as the fused SDPA kernels run it (flash /
               memory-efficient on GPU, flash on CPU): q, k, v, output and a (B, heads, N) log-sum-exp,
               never the N x N score matrix. With gradient checkpointing, diffusers checkpoints every
               ResNet and transformer block: such a block keeps only its inputs, and the backward pass
               recomputes one block at a time, so activations = saved outside blocks + block inputs +
               the largest block's own saved tensors.
               Mixed precision is emulated on meta by autocast's rules for the ops that dominate a UNet:
               conv / linear / matmul / attention run in the autocast dtype (2 bytes), GroupNorm /
               LayerNorm / softmax in fp32 (4 bytes), everything else keeps its input's dtype.
               The lower step also keeps the teacher's captured block outputs (feature KD) and its
               prediction; the upper step runs at `upper_batch_size`. Peak activations = the larger step.
  setup        while the pools are built: teacher + student weights + VAE + text encoder (freed afterwards).

Peak = max(setup, persistent + activations). Not counted: the CUDA context and allocator fragmentation
(typically 0.5-1.5 GiB on a GPU), the teacher's short-lived no-grad intermediates (smaller than the
student's saved activations, and freed before the student runs), and the data loader. The CPU test checks
the estimate against a measured peak within 25 % on a small UNet (tests/test_memory.py).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from safeprune.bilevel import build_method, uses_upper
from safeprune.config import Config
from safeprune.models.hooks import feature_blocks
from safeprune.optim import optimizer_of
from safeprune.pruning.depth import stacks as depth_stacks
from safeprune.pruning.measure import family_of, meta_model, model_inputs, run_model
from safeprune.unlearning import PARAMETER_SETS, UNLEARNING, build_unlearning
from safeprune.utils import DTYPES

GIB = 2**30


# ----------------------------------------------------------------------------- meta-device measurement


class _FlashLikeSDPA(torch.autograd.Function):
    """Scaled dot-product attention that saves what the fused kernels save (q, k, v, out, lse), on meta."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, heads, N, d_v)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, heads, N): the log-sum-exp of each row
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the graph is only measured
        raise NotImplementedError


_LOW = {F.conv2d, F.linear, torch.matmul, torch.bmm, torch.baddbmm}  # autocast: lower precision
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax}  # autocast: float32


class _MetaAutocast(torch.overrides.TorchFunctionMode):
    """Autocast's casting rules (see module doc) and fused attention, for a forward pass on meta tensors."""

    def __init__(self, dtype: torch.dtype | None, weight_copies: set[int] | None = None):
        super().__init__()
        self.dtype = dtype  # None = no mixed precision
        self.weight_copies = weight_copies if weight_copies is not None else set()  # ids of cast weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # diffusers' attention dispatcher (Flux, SD3) passes query / key / value by keyword
            qkv = list(args[:3]) + [kwargs[k] for k in ("query", "key", "value")[len(args[:3]):]]
            q, k, v = (self._cast(t, self.dtype) for t in qkv)  # attention runs in the autocast dtype
            return _FlashLikeSDPA.apply(q, k, v)
        if self.dtype is not None and func in _LOW:
            args = tuple(self._cast(a, self.dtype) for a in args)
        elif self.dtype is not None and func in _FP32:
            args = tuple(self._cast(a, torch.float32) for a in args)
        return func(*args, **kwargs)

    def _cast(self, t, dtype):
        if dtype is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        out = t.to(dtype)
        if isinstance(t, torch.nn.Parameter):  # autocast's per-forward weight copies: counted per model, not image
            self.weight_copies.add(id(out))
        return out


class _SavedBytes:
    """saved_tensors_hooks that add up the bytes autograd keeps, each storage once, weights excluded."""

    def __init__(self, exclude: set[int], seen: set[int]):
        self.exclude, self.seen, self.keep, self.bytes = exclude, seen, [], 0

    def add(self, t: torch.Tensor) -> int:
        base = t._base if t._base is not None else t
        if id(base) in self.exclude or id(base) in self.seen:
            return 0
        self.seen.add(id(base))
        self.keep.append(base)  # keeps the id unique while counting
        nbytes = base.numel() * base.element_size()
        self.bytes += nbytes
        return nbytes

    @contextlib.contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (self.add(t), t)[1], lambda t: t):
            yield self


@dataclass
class ActivationProfile:
    """Saved-for-backward bytes of one student forward pass (see the module doc)."""

    outside: int  # saved by ops outside checkpointable blocks
    block_inputs: int  # inputs of checkpointable blocks (all a checkpointed block keeps)
    blocks: list[int] = field(default_factory=list)  # each block's own saved bytes, in call order

    def total(self, checkpointing: bool) -> int:
        if checkpointing:
            return self.outside + self.block_inputs + max(self.blocks, default=0)
        return self.outside + sum(self.blocks)


def meta_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """The same architecture on the meta device (pass a meta model to avoid a temporary copy of the weights)."""
    return copy.deepcopy(unet).to("meta")  # a copy: never move the caller's model


def profile_activations(unet: torch.nn.Module, batch: int, latent_size: int, text_tokens: int,
                        mixed_precision: str = "no") -> ActivationProfile:
    """Measure `unet`'s saved activations for one training forward pass at (batch, C, latent_size^2), on meta."""
    model = meta_copy(unet).train().requires_grad_(True)
    # weights, buffers and (filled while running) the autocast copies of weights are not activations
    weights = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    seen: set[int] = set()
    outer = _SavedBytes(weights, seen)
    profile = ActivationProfile(0, 0)

    def checkpoint(fn, *args, **kwargs):  # stands in for torch.utils.checkpoint: records, does not recompute
        profile.block_inputs += sum(outer.add(a) for a in args if isinstance(a, torch.Tensor))
        with _SavedBytes(weights, seen).hooks() as inner:
            out = fn(*args, **kwargs)
        profile.blocks.append(inner.bytes)
        return out

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    inputs = model_inputs(model, batch, text_tokens, latent_size)  # meta tensors: the model is on meta
    low = None if mixed_precision in ("", "no") else DTYPES[mixed_precision]  # "": not resolved yet = no
    with outer.hooks(), _MetaAutocast(low, weights):
        run_model(model, inputs)
    profile.outside = outer.bytes - profile.block_inputs
    return profile


def feature_bytes(unet: torch.nn.Module, batch: int, latent_size: int, text_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the block outputs feature KD captures (every down, mid and up block of a UNet; every transformer
    block of a diffusion transformer, all of its outputs) plus the prediction."""
    model = meta_copy(unet).eval()  # shapes only: the bytes follow from `dtype`
    sizes = []
    # capture_features keeps a UNet block's main output (a down block's first tuple element)
    if family_of(model) == "UNet2DConditionModel":
        names = feature_blocks(model)
        size = lambda o: (o[0] if isinstance(o, tuple) else o).numel()  # noqa: E731
    else:  # each block's outputs (Flux / SD3: text and image streams) until the family layer names its KD blocks
        names = [f"{stack}.{i}" for stack, n in depth_stacks(model).items() for i in range(n)]
        size = lambda o: sum(t.numel() for t in (o if isinstance(o, tuple) else (o,)) if t is not None)  # noqa: E731
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: sizes.append(size(o))) for n in names]
    with torch.no_grad(), _MetaAutocast(None):
        out = run_model(model, model_inputs(model, batch, text_tokens, latent_size))
    for h in hooks:
        h.remove()
    return (sum(sizes) + out.numel()) * torch.finfo(dtype).bits // 8


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process by component; `peak` is what to compare with a GPU's memory."""

    parts: dict[str, int]  # student, grads, optimizer, teacher, pools, ddp_buckets, activations, encoders
    activations_per_sample: int  # lower step, per image (student saved tensors + teacher features)
    student_params: int
    teacher_params: int

    @property
    def training(self) -> int:
        return sum(v for k, v in self.parts.items() if k != "encoders")

    @property
    def setup(self) -> int:
        p = self.parts
        return p["student"] + p["teacher"] + p["encoders"] + p["pools"]

    @property
    def peak(self) -> int:
        return max(self.training, self.setup)

    def summary(self) -> str:
        gib = {k: f"{v / GIB:.2f}" for k, v in self.parts.items()}
        return (f"estimated peak memory per GPU: {self.peak / GIB:.1f} GiB; params {gib['student']} (student "
                f"{self.student_params / 1e6:.0f} M), grads {gib['grads']}, optimiser {gib['optimizer']}, teacher "
                f"{gib['teacher']} ({self.teacher_params / 1e6:.0f} M), pools {gib['pools']}, activations "
                f"{gib['activations']} ({self.activations_per_sample / 2**20:.0f} MiB per image), DDP buckets "
                f"{gib['ddp_buckets']}, autocast weight copies {gib['weight_copies']}; setup "
                + (f"(VAE + text encoder {gib['encoders']}) " if self.parts["encoders"] else "(without VAE/text encoder) ")
                + f"{self.setup / GIB:.1f} GiB; "
                "plus the CUDA context and fragmentation (~0.5-1.5 GiB)")


def estimate_memory(cfg: Config, student: torch.nn.Module, teacher: torch.nn.Module, *, latent_size: int,
                    text_tokens: int = 77, processes: int = 1, encoder_params: int = 0,
                    prompts: int | None = None) -> MemoryEstimate:
    """Peak memory per process of `finetune` with `cfg` for this student/teacher pair (architectures only:
    pass meta-device models, e.g. from `meta_unet`). `latent_size` = image side / VAE scale; `encoder_params`
    = VAE + text encoder parameters; `prompts` = rows of the embedding table (default: one per pool image)."""
    ft = cfg.finetune
    # two_stage with a whole-model erasure method (uce, ...) distils only: no upper optimiser during the run
    unlearn = uses_upper(build_method(ft)) and ft.unlearn.name in UNLEARNING
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_upper = 0
    if unlearn:  # the upper optimiser holds state only for the parameters its loss moves
        keep = PARAMETER_SETS[build_unlearning(ft.unlearn.name, ft.unlearn).params]
        n_upper = sum(p.numel() for n, p in student.named_parameters() if keep(n))
    t_dtype = DTYPES[ft.teacher_dtype]
    shapes = model_inputs(student, 1, text_tokens, latent_size)  # meta tensors: one latent and its text embedding
    latent = shapes["sample" if "sample" in shapes else "hidden_states"]
    cross = shapes["encoder_hidden_states"].shape[-1]
    latent_bytes = 2 * latent.numel() * 4  # mean + std, fp32
    prompts = prompts if prompts is not None else ft.data.pool + 2 * len(ft.concepts) + 1

    lower = profile_activations(student, ft.batch_size, latent_size, text_tokens, ft.mixed_precision)
    lower_act = lower.total(ft.gradient_checkpointing)
    lower_act += feature_bytes(teacher, ft.batch_size, latent_size, text_tokens, t_dtype)
    upper_act = 0
    if unlearn:
        upper = profile_activations(student, ft.upper.batch_size, latent_size, text_tokens, ft.mixed_precision)
        upper_act = upper.total(ft.gradient_checkpointing)
    parts = {
        "student": 4 * n_student,
        "grads": 4 * n_student,
        "optimizer": optimizer_of(ft.optimizer).state_bytes * (n_student + n_upper),
        "teacher": n_teacher * torch.finfo(t_dtype).bits // 8,
        "pools": latent_bytes * (ft.data.pool + (ft.data.concept_pool if unlearn else 0)) + prompts * text_tokens * cross * 4,
        "ddp_buckets": 4 * n_student if processes > 1 else 0,
        # autocast keeps a low-precision copy of each weight for the backward pass; checkpointed blocks
        # re-make theirs during recomputation, so with checkpointing (nearly) none is kept
        "weight_copies": 2 * n_student if ft.mixed_precision not in ("", "no") and not ft.gradient_checkpointing else 0,
        "activations": max(lower_act, upper_act),
        "encoders": 4 * encoder_params,
    }
    return MemoryEstimate(parts, lower_act // ft.batch_size, n_student, n_teacher)


def meta_unet(config: dict) -> torch.nn.Module:
    """A diffusers UNet2DConditionModel (or the diffusion transformer the config's `_class_name` names) built from a
    config dict on the meta device (seconds at SD scale)."""
    if config.get("_class_name", "UNet2DConditionModel") not in ("UNet2DConditionModel", "PrunedUNet2DConditionModel"):
        return meta_model(config)
    with init_empty_weights():
        return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def device_memory(device) -> int:
    """Bytes of memory of `device`: a GPU's total memory, else the machine's physical memory."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(estimate: MemoryEstimate, device) -> None:
    """A one-line UserError when the estimated peak exceeds the device's memory (before anything is written)."""
    from safeprune.errors import UserError

    have = device_memory(device)
    if estimate.peak > have:
        raise UserError(f"this run needs about {estimate.peak / GIB:.1f} GiB (estimated peak per process) but "
                        f"{torch.device(device).type} memory is {have / GIB:.1f} GiB; lower finetune.batch_size, "
                        "finetune.resolution or the pool sizes, or enable finetune.gradient_checkpointing")
