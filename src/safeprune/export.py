"""`safeprune export --format onnx`: a student's denoiser (any family, any pruning method) to ONNX, checked and
timed in onnxruntime.

ONNX is how pruned models reach phones and edge runtimes (onnxruntime, its mobile builds, TensorRT, ...). The
denoiser (UNet or transformer) is the part pruning changes and the part that runs once per sampling step, so it
is what is exported; the VAE decoder and the text encoders are the teacher's and export the same way for every
student.

  OUT/unet.onnx            the denoiser's raw call with the inputs its family's pipeline passes (`example_inputs`):
  (or transformer.onnx)    SD (sample, timestep, encoder_hidden_states), SDXL + text_embeds, time_ids; SD3
                           (hidden_states, encoder_hidden_states, pooled_projections, timestep); Flux packed latent
                           tokens + img_ids, txt_ids [, guidance]; PixArt + encoder_attention_mask [, resolution,
                           aspect_ratio] -> noise_pred (the family's prediction; PixArt's with its variance half),
                           with dynamic batch and text-length axes; weights beside it (.onnx.data) when large
  OUT/teacher_unet.onnx    with --teacher: the teacher's denoiser, exported the same way
  OUT/export_report.json   max |onnxruntime - torch| on fixed random inputs (per model), the onnxruntime
                           latency of one call (median of --runs after a warm-up) and the student / teacher
                           latency ratio

The check runs the exported graph in onnxruntime (CPU) and torch on the same inputs; `max_abs_diff` above
`--tolerance` (default 1e-4) is an error, so an export that silently changed the model does not pass.
Needs the optional extra: pip install 'safeprune[onnx]' (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from safeprune.config import Config, save_config
from safeprune.errors import UserError, check
from safeprune.utils import atomic_folder

FORMATS = ("onnx",)
# torch.onnx's two exporters: `dynamo` (torch.export, the maintained one, the default) and `torchscript` (the
# older tracer: deprecated, but several times faster to export; kept for quick checks and older runtimes)
EXPORTERS = ("dynamo", "torchscript")
# inputs the families pass inside `added_cond_kwargs`: SDXL's pooled text + time ids, PixArt-alpha 1024's sizes
ADDED_CONDITIONS = ("text_embeds", "time_ids", "resolution", "aspect_ratio")
NO_BATCH_AXIS = ("img_ids", "txt_ids")  # Flux's rotary position ids
TEXT_AXIS = {"encoder_hidden_states": 1, "encoder_attention_mask": 1, "txt_ids": 0}
# The torchscript tracer bakes these models' shapes in (Flux's rotary embedding reshapes to x.shape[:-1] as
# constants): their torchscript graphs take the example's shapes only; the dynamo exporter keeps the axes dynamic.
STATIC_UNDER_TORCHSCRIPT = ("FluxTransformer2DModel",)


class _DenoiserCall(torch.nn.Module):
    """The denoiser as a plain tensors -> tensor function of its named inputs (ONNX graphs take and return
    tensors, not dataclasses or nested dicts): the ADDED_CONDITIONS go back into `added_cond_kwargs`."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors))
        added = {k: kwargs.pop(k) for k in ADDED_CONDITIONS if k in kwargs}
        if added:
            kwargs["added_cond_kwargs"] = added
        return self.model(**kwargs, return_dict=False)[0]


def example_inputs(model, batch: int, text_tokens: int, seed: int = 0,
                   sample_size: int | None = None) -> dict[str, torch.Tensor]:
    """Fixed random inputs of one call of the denoiser in the order of its graph's inputs, as each family's pipeline
    passes them (safeprune.pruning.measure.model_inputs): UNets (sample, timestep, encoder_hidden_states [, SDXL's
    text_embeds, time_ids]); SD3 (hidden_states, encoder_hidden_states, pooled_projections, timestep); Flux
    2x2-packed latent tokens with img_ids / txt_ids [and guidance]; PixArt its T5 mask [and the 1024 px sizes].
    Timesteps spread over the schedule in the family's units and dtype (DDPM int64; SD3 float; Flux float t / 1000).
    Float inputs are fp32, as the exported graph. `sample_size`: the latent side (default: the config's; Flux: 1024 px)."""
    from safeprune.pruning.measure import model_inputs

    inputs = model_inputs(model, batch, text_tokens, sample_size, torch.Generator().manual_seed(seed))
    added = inputs.pop("added_cond_kwargs", None) or {}
    inputs |= {k: v for k, v in added.items() if v is not None}  # None = a condition the config does not have
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    mid = inputs["timestep"][0]  # the family's middle timestep: 500, or Flux's 0.5
    spread = torch.linspace(50, 950, batch) * (mid / 500)
    inputs["timestep"] = spread if mid.is_floating_point() else spread.round().to(torch.int64)
    return inputs


def dynamic_axes(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """{input: {axis: "batch" | "text"}}: the batch axis of every input but Flux's position ids (one row per token,
    shared by the batch), and the text-length axis of the prompt states, PixArt's mask and Flux's text ids."""
    axes = {k: {0: "batch"} for k in inputs if k not in NO_BATCH_AXIS}
    for name, axis in TEXT_AXIS.items():
        if name in inputs:
            axes.setdefault(name, {})[axis] = "text"
    return axes


def export_onnx(unet, path: str | Path, inputs: dict[str, torch.Tensor], opset: int = 18,
                exporter: str = "dynamo") -> Path:
    """Write the denoiser `unet` (fp32, eval) to `path` as ONNX, its inputs named as `inputs`' keys (from
    `example_inputs`), with dynamic batch and text-length axes, through torch.onnx."""
    import importlib.util

    check(exporter in EXPORTERS, f"exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    check(not missing, f"ONNX export needs {', '.join(missing)}: pip install 'safeprune[onnx]'")
    names = list(inputs)
    model = _DenoiserCall(unet.float().eval(), names)
    args = tuple(inputs.values())
    axes = graph_axes(unet, inputs, exporter)
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                from torch.export import Dim

                dims = {"batch": Dim("batch", min=1, max=1024), "text": Dim("text", min=1, max=4096)}
                program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=names,
                                            output_names=["noise_pred"], verbose=False,
                                            dynamic_shapes=(tuple({i: dims[d] for i, d in axes.get(k, {}).items()}
                                                                  for k in names),))  # forward(*tensors)
                large = sum(p.numel() for p in unet.parameters()) * 4 > 1.8e9  # protobuf's 2 GB limit
                program.save(str(path), external_data=large)
            else:
                opset = min(opset, 17)
                torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)  # Flux's QK norms
                torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                                  output_names=["noise_pred"], dynamic_axes=axes)
    except Exception as err:  # the exporters raise many types; one line says which model failed
        raise UserError(f"torch.onnx could not export this denoiser ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})") from err
    _drop_noop_squeezes(Path(path))
    return Path(path)


def graph_axes(unet, inputs: dict[str, torch.Tensor], exporter: str) -> dict[str, dict[int, str]]:
    """The dynamic axes the exported graph has (none for STATIC_UNDER_TORCHSCRIPT models under torchscript)."""
    from safeprune.pruning.measure import family_of

    return {} if exporter == "torchscript" and family_of(unet) in STATIC_UNDER_TORCHSCRIPT else dynamic_axes(inputs)


def _rms_norm(g, x, normalized_shape, weight, eps):
    """aten::rms_norm for the torchscript exporter (opset <= 17 has no RMSNormalization; torch.nn.RMSNorm, which
    Flux's attention uses, has no symbolic there): x / sqrt(mean(x^2) + eps) * weight over the last dims."""
    from torch.onnx import symbolic_helper as sh

    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    eps = torch.finfo(torch.float32).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    out = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps)))))
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


def _drop_noop_squeezes(path: Path) -> None:
    """Rewrite Squeezes of a dimension whose size is known and not 1 as Identity, in place.

    torch's squeeze(dim) is a no-op on such a dimension, ONNX's Squeeze an error: PixArt's transformer squeezes
    its (B, N, C) output at dim 1 (diffusers' pixart_transformer_2d.py), and with a dynamic batch both exporters
    keep that Squeeze (torchscript inside an If on the size), which onnxruntime rejects once it infers N. The
    external weights (if any) are left where they are."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.input]}

    def constants(graph) -> dict:
        found = {i.name: numpy_helper.to_array(i) for i in graph.initializer if not i.external_data}
        return found | {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}

    def noop_input(node, consts) -> str | None:
        """The squeezed tensor if this Squeeze removes no size-1 dimension, else None."""
        if node.op_type != "Squeeze" or len(node.input) != 2 or node.input[1] not in consts:
            return None
        shape = shapes.get(node.input[0])
        axes = [int(a) for a in consts[node.input[1]].reshape(-1)]
        if shape is None or not axes or any(not -len(shape) <= a < len(shape) or shape[a] in (None, 1) for a in axes):
            return None
        return node.input[0]

    top, changed = constants(model.graph), False
    for node in model.graph.node:
        source = noop_input(node, top)
        if node.op_type == "If":  # torchscript: If(size == 1) then Squeeze(x) else Identity(x)
            branch = next(a.g for a in node.attribute if a.name == "then_branch")
            squeezes = [n for n in branch.node if n.op_type != "Constant"]
            source = noop_input(squeezes[0], constants(branch)) if len(squeezes) == 1 else None
        if source is not None:
            node.CopyFrom(helper.make_node("Identity", [source], list(node.output), name=node.name))
            changed = True
    if changed:
        onnx.save(model, str(path))


def _session(path: Path, threads: int):
    import importlib.util

    check(importlib.util.find_spec("onnxruntime") is not None,
          "checking the ONNX export needs onnxruntime: pip install 'safeprune[onnx]'")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_and_time(path: Path, unet, inputs: dict[str, torch.Tensor], runs: int, threads: int) -> dict:
    """max |onnxruntime - torch| on `inputs` and the onnxruntime latency of one call (median of `runs`)."""
    session = _session(path, threads)
    feed = {k: v.numpy() for k, v in inputs.items()}
    with torch.no_grad():
        reference = _DenoiserCall(unet.float().eval(), list(inputs))(*inputs.values()).numpy()
    (output,) = session.run(None, feed)
    check(output.shape == reference.shape, f"the ONNX graph returns {output.shape}, torch {reference.shape}")
    diff = float(np.abs(output - reference).max())
    times = []
    for _ in range(runs + 1):  # the first call is a warm-up (allocations, kernel selection)
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {"max_abs_diff": diff, "latency_ms": round(statistics.median(times[1:]), 3),
            "file_mb": round(sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20, 2)}


def run(cfg: Config, args) -> int:
    """`safeprune export --model DIR --format onnx --out DIR [--teacher DIR|HUB_ID|toy]`."""
    from safeprune.backbones import backbone_for_config
    from safeprune.models.io import load_unet, pretrained_folder
    from safeprune.models.shipped import teacher_path
    from safeprune.pruning.measure import family_of
    from safeprune.recipes.prune import _text_tokens

    check(args.format in FORMATS, f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
    check(args.runs >= 1 and args.batch >= 1, "--runs and --batch must be >= 1")
    check(args.exporter in EXPORTERS, f"--exporter {args.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    out = Path(cfg.paths.out)
    check(not (out.exists() and any(out.iterdir())),
          f"output folder {str(out)!r} already exists and is not empty; pass a new path or delete it")
    model = pretrained_folder(cfg.paths.model) if cfg.paths.model else teacher_path()
    unet = load_unet(model)
    # unet / transformer: the file and report names (the pipeline's component)
    component = backbone_for_config({"_class_name": family_of(unet), **unet.config}).denoiser
    pipeline = _pipeline_of(model)
    # the text length of the check and the timing (the graph takes any): what the model's pipeline encodes, else
    # the family's default (CLIP 77; SD3 77 + 256 T5, Flux 512, PixArt 120)
    tokens = _text_tokens(pipeline, unet)
    inputs = example_inputs(unet, args.batch, tokens, cfg.seed)
    threads = torch.get_num_threads()
    models = {component: unet}
    if args.export_teacher:
        name = args.export_teacher
        teacher = teacher_path() if name == "toy" else pretrained_folder(name, cfg.model.revision,
                                                                         cfg.model.allow_download)
        models[f"teacher_{component}"] = load_unet(teacher)
    report = {"format": "onnx", "model": cfg.paths.model or "toy-teacher", "denoiser": family_of(unet),
              "opset": args.opset, "exporter": args.exporter, "dynamic_axes": graph_axes(unet, inputs, args.exporter),
              "inputs": {k: list(v.shape) for k, v in inputs.items()}, "threads": threads, "runs": args.runs,
              "tolerance": args.tolerance}
    with atomic_folder(out) as tmp:
        for name, net in models.items():
            path = export_onnx(net, tmp / f"{name}.onnx", inputs, args.opset, args.exporter)
            report[name] = check_and_time(path, net, inputs, args.runs, threads)
            print(f"{name}: max |onnxruntime - torch| = {report[name]['max_abs_diff']:.2e}, "
                  f"{report[name]['latency_ms']:.2f} ms per call ({report[name]['file_mb']} MB)")
            check(report[name]["max_abs_diff"] <= args.tolerance,
                  f"{name}: the ONNX graph differs from torch by {report[name]['max_abs_diff']:.2e} "
                  f"(> --tolerance {args.tolerance}); the export is not faithful")
        if f"teacher_{component}" in report:
            report["latency_ratio"] = round(report[component]["latency_ms"] / report[f"teacher_{component}"]["latency_ms"],
                                            4)
            print(f"student / teacher latency in onnxruntime: {report['latency_ratio']:.3f}")
        (tmp / "export_report.json").write_text(json.dumps(report, indent=1))
        save_config(cfg, tmp)
    print(f"wrote {out}/")
    return 0


def _pipeline_of(folder: Path) -> Path | None:
    """The pipeline folder around a model (its tokenizer sets the text length), or None."""
    from safeprune.models.io import model_folder

    folder = model_folder(folder)
    return folder if (folder / "model_index.json").is_file() else None
