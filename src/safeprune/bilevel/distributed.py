"""The two-optimiser bilevel step under `accelerate launch`: data parallel (DDP) and sharded (FSDP).

The step holds ONE set of weights and TWO AdamW optimisers over it (lower: every weight; upper: the subset
the unlearning loss moves, `safeprune.unlearning.select_parameters`). Both optimisers go through the same
`accelerator.prepare` call as the student, so Accelerate wraps both (mixed-precision scaling, FSDP parameter
mapping).

- DDP replicates the weights and all-reduces gradients in every backward pass (lower and upper alike);
  each rank steps its own copy of both optimisers on identical gradients, so replicas stay equal.
  `in_sync` checks that claim for the weights and for both optimisers' moments (one all-gather).
- FSDP v1 with `use_orig_params: true` keeps the original `Parameter` objects and turns them into views of
  each rank's shard (size 0 where the rank holds none of a tensor), so optimisers built BEFORE `prepare`
  keep their parameter subsets (FSDP v2: Accelerate maps them by data pointer). What changes with shards:
  * the unwrapped UNet must never be called (its parameters are shards): evaluate through the wrapper;
  * a gradient norm is the square root of the all-reduced sum of per-shard squares (shards are disjoint),
    also for the upper optimiser's subset, where `accelerator.clip_grad_norm_` would use the local shard;
  * weights and optimiser states are gathered into full tensors on every rank (collectives) for checkpoints
    and the saved result, and scattered back on resume, so an FSDP checkpoint has the same files and keys as
    a single-process one (resuming it under the other launcher is untested). Weights and FSDP v2
    optimisers go through `torch.distributed.checkpoint.state_dict`; FSDP v1's optimiser state dict
    refuses an optimiser that covers only part of a flat parameter (the upper one), so v1 optimiser states
    are gathered here;
  * per-parameter state kept outside the optimisers (magnitude masks, the EMA copy) and optimiser state that
    is not per element (8-bit Adam) are not sharded: refused with a one-line error.
Tested on two CPU ranks against DDP (tests/finetune/test_fsdp_cpu.py); not yet on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from safeprune.errors import UserError, check
from safeprune.models.hooks import canonical_name
from safeprune.pruning.magnitude import MASK


def is_sharded(accelerator) -> bool:
    """Whether Accelerate shards the student (FSDP v1 or v2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_shardable(accelerator, student: torch.nn.Module, ema_decay: float) -> None:
    """Refuse, before wrapping, what FSDP cannot shard here (one-line UserErrors)."""
    if not is_sharded(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    check(plugin.fsdp_version != 1 or plugin.use_orig_params,
          "FSDP v1 needs fsdp_use_orig_params: true here (both optimisers are built over the original parameters); "
          "see src/safeprune/configs/accelerate/fsdp_4gpu.yaml")
    check(ema_decay == 0, "finetune.ema_decay > 0 is not supported under FSDP (the EMA copy is not sharded); set "
                          "finetune.ema_decay=0 or launch with DDP (src/safeprune/configs/accelerate/ddp_4gpu.yaml)")
    check(not any(getattr(m, MASK, None) is not None for m in student.modules()),
          "a magnitude-pruned student (sparsity masks) cannot be trained under FSDP (masks are not sharded); "
          "launch with DDP (src/safeprune/configs/accelerate/ddp_4gpu.yaml)")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (FSDP v2 parameters and gradients are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_(accelerator, params: list[torch.nn.Parameter], max_norm: float, optimizer=None) -> torch.Tensor:
    """Clip the gradients of `params` (those of `optimizer`, the one about to step) to a global L2 norm of
    `max_norm`; returns the norm before clipping.

    fp16: only `optimizer`'s gradients are unscaled. `accelerator.clip_grad_norm_` unscales through EVERY
    prepared optimiser, and the lower and upper ones share parameters, so the shared gradients would be
    divided by the loss scale twice (and the step, not knowing, would not undo it).
    """
    accelerator.unscale_gradients(optimizer)  # fp16: the norm of the true gradients; a no-op otherwise
    if not is_sharded(accelerator):  # DDP: gradients are already all-reduced
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [_local(p.grad) for p in params if p.grad is not None]
    squares = torch.zeros((), device=accelerator.device, dtype=torch.float32)
    for g in grads:
        squares += g.float().pow(2).sum()
    torch.distributed.all_reduce(squares)  # disjoint shards: squared norms add up
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


# ----------------------------------------------------------------------------- full state dicts


class StateDictView:
    """What `safeprune.checkpoint` and `write_unet` need of a module or an optimiser (`state_dict` /
    `load_state_dict`), for a sharded student: gathering and scattering happen here, on every rank."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.state: dict | None = None

    def _options(self, **kwargs):
        # Offloading gathered tensors to the CPU saves GPU memory; on CPU ranks it crashes torch 2.13 (gloo).
        return StateDictOptions(full_state_dict=True, cpu_offload=self.accelerator.device.type != "cpu", **kwargs)

    def gather(self) -> StateDictView:
        """Collective: every rank must call it; afterwards `state_dict()` holds full tensors."""
        if self.optimizer is None:
            self.state = get_model_state_dict(self.model, options=self._options())
        elif self.accelerator.is_fsdp2:
            self.state = _by_index(get_optimizer_state_dict(self.model, self.optimizer, options=self._options()))
        else:  # FSDP v1's own optimiser state dict refuses an optimiser over part of a flat parameter (upper)
            self.state = _gather_fsdp1_optimizer(self.model, self.optimizer, self.accelerator.device)
        return self

    def state_dict(self) -> dict:
        check(self.state is not None, "internal: StateDictView.gather() must run on every rank before state_dict()")
        return self.state

    def load_state_dict(self, state: dict) -> None:
        """Collective: every rank loads the same full state; each keeps its shard."""
        if self.optimizer is None:
            set_model_state_dict(self.model, state, options=self._options())
        elif self.accelerator.is_fsdp2:
            set_optimizer_state_dict(self.model, self.optimizer, _by_name(state, self.optimizer, self.model),
                                     options=self._options())
        else:
            _scatter_fsdp1_optimizer(self.model, self.optimizer, state, self.accelerator.device)


# FSDP v1 (use_orig_params): each original parameter is a 1-D view of the part of it that lies in this rank's
# chunk of a flat parameter; chunk r belongs to rank r of the sharding group, so the ranks' views, in rank
# order, concatenate to the flattened full parameter. Per-element optimiser state (exp_avg, exp_avg_sq) has
# the view's shape and gathers the same way; 0-dim state (step) is the same on every rank that holds the
# parameter (a rank whose view is empty gets no gradient and keeps no state for it).


def _fsdp1_layout(model, optimizer, device) -> tuple[list, list[torch.Size], torch.Tensor, object]:
    """(parameters in optimiser order, their full shapes, (ranks, params) view sizes, the sharding group)."""
    shapes = {}
    for module in FSDP.fsdp_modules(model):
        flat = module._handle.flat_param if module._handle is not None else None
        if flat is not None:
            shapes |= {id(p): shape for p, shape in zip(flat._params, flat._shapes)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group = model.process_group
    local = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return params, [shapes[id(p)] for p in params], torch.stack(sizes).cpu(), group


def _state_keys(optimizer, params, group) -> dict[str, tuple[torch.dtype, bool]]:
    """{state key: (dtype, 0-dim?)} over every rank (a rank may hold no state for some parameters)."""
    mine = {k: (v.dtype, v.dim() == 0) for p in params for k, v in optimizer.state.get(p, {}).items()
            if torch.is_tensor(v)}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {k: v for d in everyone for k, v in d.items()}


@torch.no_grad()
def _gather_fsdp1_optimizer(model, optimizer, device) -> dict:
    """This optimiser's full state in torch's index-keyed format (CPU tensors), on every rank."""
    params, shapes, sizes, group = _fsdp1_layout(model, optimizer, device)
    keys = _state_keys(optimizer, params, group)  # the same on every rank: so are the collectives below
    state = {}
    for i, (p, shape) in enumerate(zip(params, shapes)):
        mine = optimizer.state.get(p, {})
        for key, (dtype, scalar) in keys.items():
            value = mine.get(key)
            if scalar:  # e.g. step: equal on every rank that holds it; -1 marks "none here"
                step = torch.full((1,), -1.0 if value is None else float(value), dtype=torch.float64, device=device)
                dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
                if step.item() >= 0:
                    state.setdefault(i, {})[key] = step.to(dtype).reshape(()).cpu()
                continue
            if value is not None and value.shape != p.shape:
                raise UserError(f"optimizer state {key!r} is not per element (shape {tuple(value.shape)}), so FSDP "
                                "cannot shard it here; use finetune.optimizer=adamw or launch with DDP")
            padded = torch.zeros(int(sizes[:, i].max()), dtype=dtype, device=device)  # all_gather: equal sizes
            if value is not None:
                padded[: value.numel()] = value.detach().reshape(-1)
            parts = [torch.empty_like(padded) for _ in range(len(sizes))]
            dist.all_gather(parts, padded, group=group)
            if int(sizes[:, i].sum()):
                full = torch.cat([part[: int(n)] for part, n in zip(parts, sizes[:, i])])  # rank order
                state.setdefault(i, {})[key] = full.reshape(shape).cpu()
    groups, start = [], 0
    for g in optimizer.state_dict()["param_groups"]:
        groups.append({**g, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return {"state": state, "param_groups": groups}


def _scatter_fsdp1_optimizer(model, optimizer, state: dict, device) -> None:
    """Load a full index-keyed optimiser state: each rank keeps its slice of every per-element tensor."""
    params, _, sizes, group = _fsdp1_layout(model, optimizer, device)
    rank = dist.get_rank(group)
    local = {}
    for i, p in enumerate(params):
        start, n = int(sizes[:rank, i].sum()), int(sizes[rank, i])
        entry = state["state"].get(i, state["state"].get(str(i)))
        if entry is None or n == 0:
            continue  # a rank with an empty view keeps no state for the parameter (as in training)
        local[i] = {k: v if v.dim() == 0 else v.reshape(-1)[start:start + n].clone() for k, v in entry.items()}
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


def _by_index(osd: dict) -> dict:
    """A name-keyed optimiser state dict (torch.distributed.checkpoint) -> torch's index-keyed format,
    numbering parameters in optimiser order, as `Optimizer.state_dict()` does."""
    order = [name for group in osd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in osd["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": {index[name]: value for name, value in osd["state"].items()}, "param_groups": groups}


def _by_name(state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The inverse of `_by_index` for this optimiser's parameters (names without wrapper segments)."""
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}


# ----------------------------------------------------------------------------- replicas agree


INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer dtype


@torch.no_grad()
def _digest(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim int64 digest of the exact bits of `tensors`, computed where they live (no host copies of
    gigabytes of optimiser state): per tensor the sum of its bit patterns, then a position-weighted sum.
    Any one-ulp change moves it; int64 overflow wraps the same way on every rank."""
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    sums = []
    for t in tensors:
        flat = _local(t).detach().reshape(-1)
        sums.append(flat.view(INT_VIEW[flat.element_size()]).sum(dtype=torch.int64).to(tensors[0].device))
    sums = torch.stack(sums)
    return (sums * torch.arange(1, len(sums) + 1, device=sums.device)).sum()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every state tensor of `optimizer` (AdamW: step, exp_avg, exp_avg_sq), in parameter order."""
    state = optimizer.state
    return [v for g in optimizer.param_groups for p in g["params"] for _, v in sorted(state.get(p, {}).items())
            if torch.is_tensor(v)]


def in_sync(accelerator, tensors: list[torch.Tensor]) -> bool | None:
    """Whether every rank holds bit-identical `tensors` (one all-gather of a digest); None under FSDP, where
    ranks hold different shards of one copy by design."""
    if accelerator.num_processes == 1:
        return True
    if is_sharded(accelerator):
        return None
    gathered = accelerator.gather(_digest(tensors).reshape(1).to(accelerator.device))
    return bool(torch.all(gathered == gathered[0]))
