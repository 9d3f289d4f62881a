"""`safeprune export --format onnx`: a student's UNet (any pruning method) to ONNX, checked and timed in onnxruntime.

ONNX is how pruned models reach phones and edge runtimes (onnxruntime, its mobile builds, TensorRT, ...). The
UNet is the part pruning changes and the part that runs once per sampling step, so it is what is exported;
the VAE decoder and the text encoder are the teacher's and export the same way for every student.

  OUT/unet.onnx            the UNet: (sample, timestep, encoder_hidden_states) -> noise prediction, with a
                           dynamic batch axis; weights beside it (unet.onnx.data) when the model is large
  OUT/teacher_unet.onnx    with --teacher: the teacher's UNet, exported the same way
  OUT/export_report.json   max |onnxruntime - torch| on fixed random inputs (per model), the onnxruntime
                           latency of one UNet call (median of --runs after a warm-up) and the student /
                           teacher latency ratio

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
INPUT_NAMES = ["sample", "timestep", "encoder_hidden_states"]


class _UNetCall(torch.nn.Module):
    """The UNet as a plain tensor -> tensor function (ONNX graphs take and return tensors, not dataclasses)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def example_inputs(unet, batch: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed random UNet inputs of the model's own sizes: (B, C, h, w) latents, (B,) timesteps, (B, L, D) text."""
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, cfg.in_channels, h, w, generator=gen),
            "timestep": torch.linspace(50, 950, batch).round().to(torch.int64),
            "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.cross_attention_dim, generator=gen)}


def export_onnx(unet, path: str | Path, inputs: dict[str, torch.Tensor], opset: int = 18,
                exporter: str = "dynamo") -> Path:
    """Write `unet` (fp32, eval) to `path` as ONNX with a dynamic batch axis, through torch.onnx."""
    import importlib.util

    check(exporter in EXPORTERS, f"exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    check(not missing, f"ONNX export needs {', '.join(missing)}: pip install 'safeprune[onnx]'")
    model = _UNetCall(unet.float().eval())
    args = tuple(inputs[k] for k in INPUT_NAMES)
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                from torch.export import Dim

                batch = Dim("batch", min=1, max=1024)
                program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=INPUT_NAMES,
                                            output_names=["noise_pred"], verbose=False,
                                            dynamic_shapes={k: {0: batch} for k in INPUT_NAMES})
                large = sum(p.numel() for p in unet.parameters()) * 4 > 1.8e9  # protobuf's 2 GB limit
                program.save(str(path), external_data=large)
            else:
                torch.onnx.export(model, args, str(path), dynamo=False, opset_version=min(opset, 17),
                                  input_names=INPUT_NAMES, output_names=["noise_pred"],
                                  dynamic_axes={k: {0: "batch"} for k in INPUT_NAMES})
    except Exception as err:  # the exporters raise many types; one line says which model failed
        raise UserError(f"torch.onnx could not export this UNet ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})") from err
    return Path(path)


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
        reference = _UNetCall(unet.float().eval())(*(inputs[k] for k in INPUT_NAMES)).numpy()
    (output,) = session.run(None, feed)
    check(output.shape == reference.shape, f"the ONNX UNet returns {output.shape}, torch {reference.shape}")
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
    from safeprune.models.io import load_unet, pretrained_folder
    from safeprune.models.shipped import teacher_path
    from safeprune.recipes.prune import DEFAULT_TEXT_TOKENS, _text_tokens

    check(args.format in FORMATS, f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
    check(args.runs >= 1 and args.batch >= 1, "--runs and --batch must be >= 1")
    check(args.exporter in EXPORTERS, f"--exporter {args.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    out = Path(cfg.paths.out)
    check(not (out.exists() and any(out.iterdir())),
          f"output folder {str(out)!r} already exists and is not empty; pass a new path or delete it")
    model = pretrained_folder(cfg.paths.model) if cfg.paths.model else teacher_path()
    unet = load_unet(model)
    pipeline = _pipeline_of(model)
    tokens = _text_tokens(pipeline) if pipeline else DEFAULT_TEXT_TOKENS
    inputs = example_inputs(unet, args.batch, tokens, cfg.seed)
    threads = torch.get_num_threads()
    models = {"unet": unet}
    if args.export_teacher:
        name = args.export_teacher
        teacher = teacher_path() if name == "toy" else pretrained_folder(name, cfg.model.revision,
                                                                         cfg.model.allow_download)
        models["teacher_unet"] = load_unet(teacher)
    report = {"format": "onnx", "model": cfg.paths.model or "toy-teacher", "opset": args.opset, "exporter": args.exporter,
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
        if "teacher_unet" in report:
            report["latency_ratio"] = round(report["unet"]["latency_ms"] / report["teacher_unet"]["latency_ms"], 4)
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
