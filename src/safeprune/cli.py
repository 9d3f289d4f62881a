"""The `safeprune` command line: one registry dict of subcommands, each a thin shell around a recipe.

Every subcommand takes `--config FILE|PRESET`, `section.field=value` overrides, `--dry-run` (print the
resolved config and exit) and `--debug` (show tracebacks). A flag such as `--ratio 0.5` is sugar for the
override `prune.ratio=0.5`: argparse `dest`s that contain a dot are config keys. User errors print one
line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import yaml

# Model hubs are unreachable by design: fail fast instead of retrying for ~25 s.
# `model.allow_download=true` / `finetune.data.hub_data=true` lift this default (not a user's own HF_HUB_OFFLINE)
# before any hub import.
_OFFLINE_BY_DEFAULT = "HF_HUB_OFFLINE" not in os.environ
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Command:
    help: str  # one line for `safeprune --help`
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's own flags
    target: str  # "module:function" run as function(cfg, args); imported lazily so --help stays fast
    describe: str = ""  # "module:function" -> text printed after the resolved config by --dry-run (derived figures)


class Registry:
    """The names of a registry dict, read when argparse first needs them (a check or `--help`), so the choices
    are the registry's own keys and `safeprune --help` imports nothing heavy."""

    def __init__(self, where: str):
        self.where = where  # "module:attribute", a dict (or tuple) of registered names

    def names(self) -> list[str]:
        module, attr = self.where.split(":")
        return list(getattr(importlib.import_module(module), attr))

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()


# Every flag whose value is a registry key: flag dest (a config key) -> the registry. The tests check that each
# registered name is accepted here, so the CLI cannot drift from the registries.
REGISTRY_FLAGS = {
    "prune.method": Registry("safeprune.pruning:METHODS"),
    "prune.blocks.preset": Registry("safeprune.pruning.blocks:PRESETS"),
    "prune.channels.importance": Registry("safeprune.pruning.channels:IMPORTANCES"),
    "finetune.method": Registry("safeprune.bilevel.solvers:METHODS"),
    "finetune.solver.name": Registry("safeprune.bilevel.solvers:SOLVERS"),
    "finetune.unlearn.name": Registry("safeprune.erasure:FINETUNE_UNLEARN"),
    "eval.protocol": Registry("safeprune.eval.protocols:PROTOCOLS"),
    "unlearn.method": Registry("safeprune.erasure:ERASURE"),
}


def _choice(p, flag: str, dest: str, help: str) -> None:
    """A flag that sets config key `dest` to one of its registry's names (listed in --help)."""
    p.add_argument(flag, dest=dest, choices=REGISTRY_FLAGS[dest], metavar="NAME", help=f"{help}: %(choices)s")


def _out(p, help: str = "output folder", required: bool = True) -> None:
    p.add_argument("--out", dest="paths.out", required=required, help=f"{help} (paths.out)")


def _toyworld_args(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    pre = sub.add_parser("preview", help="write OUT/preview.png: a labelled grid, one row per style")
    _out(pre)
    exp = sub.add_parser("export", help="write N images + metadata.jsonl (a diffusers-style image folder)")
    exp.add_argument("folder", help="output folder (must not exist or be empty)")
    exp.add_argument("--split", default="finetune", help="pretrain | finetune | concept (default finetune)")
    exp.add_argument("--n", type=int, default=500, help="number of images (default 500)")
    for q in (pre, exp):
        _common(q)


def _pretrain_args(p):
    p.add_argument("what", choices=("teacher", "judge"), help="which embedded model to train")
    _out(p, "run folder (checkpoints, samples, the trained model)")
    p.add_argument("--arch", dest="teacher.arch", choices=("unet", "dit"), default=None,
                   help="teacher denoiser: unet (SD-format, default) or dit (SD3-class MMDiT) (teacher.arch)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out an earlier pretrain run wrote (its files only are deleted)")


def _allow_download(p, what: str) -> None:
    p.add_argument("--allow-download", dest="model.allow_download", action="store_const", const=True, default=None,
                   help=f"fetch a hub-id {what} that is not in the local Hugging Face cache")


def _prune_args(p):
    _choice(p, "--method", "prune.method", "pruning method")
    _choice(p, "--preset", "prune.blocks.preset", "blocks preset")
    p.add_argument("--ratio", dest="prune.ratio",
                   help="share of the UNet's total parameters removed (channels) or zeroed (magnitude), in [0, 1)")
    _choice(p, "--importance", "prune.channels.importance", "channels importance")
    p.add_argument("--model", dest="model.teacher",
                   help="diffusers pipeline folder, hub id in the HF cache, or a shipped teacher: toy (default), "
                        "toy-dit (model.teacher)")
    _allow_download(p, "--model")
    p.add_argument("--unet-config", "--transformer-config", dest="paths.unet_config",
                   help="prune a UNet / diffusion-transformer config.json on the meta device (no weights); a bare "
                        "name picks a shipped architecture: sd15, sd21, sdxl, sd3_medium, flux1_dev")
    p.add_argument("--calib-data", dest="paths.calib_data",
                   help="taylor importance: image folder with metadata.jsonl (default: the toy pretrain split)")
    _out(p, "output folder: model/ (a diffusers pipeline folder), prune_report.json")
    _push_arg(p)


def _finetune_args(p):
    p.add_argument("--student", dest="paths.student", help="pruned UNet folder written by `safeprune prune` (required)")
    p.add_argument("--teacher", dest="model.teacher",
                   help="teacher pipeline: a local diffusers folder, a hub id in the HF cache, or a shipped teacher: "
                        "toy (default), toy-dit (model.teacher)")
    _allow_download(p, "teacher")
    _choice(p, "--method", "finetune.method", "fine-tuning method")
    _choice(p, "--solver", "finetune.solver.name", "bilevel solver")
    _choice(p, "--unlearn", "finetune.unlearn.name",
            "upper-level (unlearning) loss, or with two_stage an erasure method run after distilling (settings: unlearn.*)")
    p.add_argument("--forget", action="append", default=None,
                   help='concept prompt to suppress (finetune.concepts); repeatable; "TARGET=>ANCHOR" sets an anchor')
    p.add_argument("--max-steps", dest="finetune.max_steps", help="lower-level iterations")
    p.add_argument("--data", dest="paths.data",
                   help="image folder with metadata.jsonl, a HF dataset folder, parquet/arrow files, or webdataset "
                        "shards such as 'shards/{000..099}.tar' (default: toy finetune split; see finetune.data.mode)")
    p.add_argument("--image-column", dest="finetune.data.image_column",
                   help="--data column holding the image (tables) or its file name (folders); default image / file_name")
    p.add_argument("--caption-column", dest="finetune.data.caption_column",
                   help="--data column holding the caption; default the first of text, caption, prompt")
    p.add_argument("--concept-data", dest="paths.concept_data", help="concept images folder (default: toy concept split)")
    p.add_argument("--anchor-data", dest="paths.anchor_data",
                   help="anchor-prompt images for --unlearn ablation (default: rendered toy anchors)")
    _out(p, "run folder (required)", required=False)
    p.add_argument("--resume", action="store_true", help="continue exactly from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out an earlier finetune run wrote (its files only are deleted)")
    p.add_argument("--allow-other-teacher", action="store_true",
                   help="distil a student that was pruned from another teacher (normally an error)")
    _push_arg(p)


def _push_arg(p):
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the finished model/ folder to this Hugging Face hub repository (needs `hf auth login`)")


def _unlearn_args(p):
    p.add_argument("--model", dest="paths.model",
                   help="diffusers pipeline folder, or a UNet folder from prune / finetune / unlearn (default: the toy "
                        "teacher)")
    _choice(p, "--method", "unlearn.method", "erasure method")
    p.add_argument("--forget", action="append", default=None,
                   help='concept prompt to erase (finetune.concepts); repeatable; "TARGET=>ANCHOR" sets an anchor '
                        "(default: unlearn.concepts, finetune.concepts, else the toy world's concept captions)")
    p.add_argument("--concept-data", dest="paths.concept_data",
                   help="concept images of the loss-based methods (esd, esd_anchor, ...; default: toy concept split)")
    _out(p, "output folder: the erased model")


def _concept_images_args(p):
    p.add_argument("--prompts", action="append", required=True, help="prompt to draw; repeatable")
    p.add_argument("--n", type=int, default=16, help="images per prompt")
    p.add_argument("--model", dest="paths.model", help="pipeline folder (default: the toy teacher)")
    _out(p, "output image folder (metadata.jsonl + PNGs)")


def _sample_args(p):
    p.add_argument("--steps", dest="sample.steps", help="sampler steps")
    p.add_argument("--guidance", dest="sample.guidance", help="classifier-free guidance scale")
    p.add_argument("--scheduler", dest="sample.scheduler", choices=Registry("safeprune.sampling:SCHEDULERS"),
                   metavar="NAME", help="sampler, recorded in results.json: %(choices)s (default ddim)")
    p.add_argument("--resolution", dest="sample.resolution", help="image side in pixels (default: the model's own)")


def _generate_args(p):
    p.add_argument("--model", dest="paths.model", help="pipeline or pruned-UNet folder, or a shipped teacher: toy (default), toy-dit")
    p.add_argument("--prompts", required=True,
                   help="toy:SET (e.g. toy:forget), a text file (one prompt per line), an I2P CSV, COCO captions JSON "
                        "or a concept YAML")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt, seeds 0..N-1")
    _sample_args(p)
    _out(p)


def _evaluate_args(p):
    p.add_argument("--model", dest="paths.model", help="pipeline or pruned-UNet folder, a hub id in the HF cache, "
                                                      "or a shipped teacher: toy (default), toy-dit")
    _choice(p, "--protocol", "eval.protocol", "evaluation protocol (default toy)")
    p.add_argument("--reference", dest="paths.reference",
                   help="reference model of the CP and CSD scores (the paper's: the distilled, unerased pruned model; "
                        "default: model.teacher; toy protocol: the toy teacher)")
    p.add_argument("--prompts", dest="eval.prompts", help="replace the protocol's prompts: a text file, an I2P CSV "
                                                          "(the nudity check), COCO captions JSON or a concept YAML")
    p.add_argument("--coco-dir", dest="eval.coco_dir", help="coco: folder with annotations/captions_val2017.json "
                                                            "and val2017/")
    p.add_argument("--reference-set", dest="eval.reference_set",
                   help="real images for FID/CMMD: an image folder, a datasets table or clean-fid statistics (.npz)")
    p.add_argument("--images", dest="eval.images", help="score an earlier evaluation's folder (no sampling)")
    p.add_argument("--n-images", dest="eval.n_images", help="images per prompt set at most")
    _sample_args(p)
    _allow_download(p, "model or metric weight")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metric names, registry safeprune.eval.metrics.METRICS (default: the "
                        "protocol's)")
    _out(p, "output folder (results.json, images/)")


def _report_args(p):
    p.add_argument("runs", nargs="+", help="run folders (finetune runs and evaluations); a folder's evaluations in "
                                           "RUN/eval/*/ merge into its row")
    _out(p, "output folder (report.md, results.json, grid.png, curves.png)")


def _export_args(p):
    p.add_argument("--model", dest="paths.model", help="model folder (run, model/, pipeline, UNet or transformer; "
                                                       "default: the toy teacher)")
    p.add_argument("--format", default="onnx", help="export format: onnx (needs pip install 'safeprune[onnx]')")
    p.add_argument("--teacher", dest="export_teacher", default=None,
                   help="also export this teacher's denoiser (folder, hub id, or 'toy') and report the latency ratio")
    p.add_argument("--batch", type=int, default=2, help="batch of the check and the timing (2 = one CFG image)")
    p.add_argument("--runs", type=int, default=20, help="timed onnxruntime calls per model (median reported)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (torchscript: at most 17)")
    p.add_argument("--exporter", default="dynamo", help="torch.onnx exporter: dynamo (default) | torchscript (faster, deprecated)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |onnxruntime - torch| accepted")
    _out(p, "output folder (unet.onnx or transformer.onnx, export_report.json)")


def _presets_args(p):
    p.add_argument("name", nargs="?", default=None,
                   help="print this preset's path, e.g. accelerate/ddp_4gpu (for accelerate launch --config_file)")


def run_presets(cfg, args) -> int:
    """List the presets shipped inside the package, or print one's path."""
    from safeprune.config import CONFIG_DIR, preset_path

    if args.name:
        print(preset_path(args.name).resolve())
        return 0
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        print(f"{str(path.relative_to(CONFIG_DIR).with_suffix('')):<24} {path}")
    return 0


def _demo_args(p):
    _out(p, "output folder (default runs/demo)", required=False)
    p.add_argument("--seeds", dest="demo.seeds", help="repeat with N seeds and report mean +- std")
    p.add_argument("--arch", choices=tuple(ARCH_PRESETS), default=None,
                   help="the toy teacher's denoiser: unet (default) or dit (the SD3-class MMDiT; = --config toy_dit)")


COMMANDS: dict[str, Command] = {
    "toyworld": Command("preview or export the embedded toy world", _toyworld_args, "safeprune.data.cli:run_toyworld"),
    "pretrain": Command("train the embedded toy teacher or judge", _pretrain_args, "safeprune.recipes.pretrain:run"),
    "prune": Command("prune a diffusers UNet and save it so it loads back", _prune_args, "safeprune.recipes.prune:run"),
    "finetune": Command("distill a pruned student and suppress concepts (bilevel)", _finetune_args,
                        "safeprune.recipes.finetune:run", "safeprune.recipes.launch:describe_finetune"),
    "unlearn": Command("erase concepts from a model (ESD, UCE, ConceptPrune, the upper-level losses)", _unlearn_args,
                       "safeprune.recipes.unlearn:run"),
    "concept-images": Command("draw concept images with the teacher (upper-level data)", _concept_images_args,
                              "safeprune.recipes.generate:run_concept_images"),
    "generate": Command("sample images for prompts, one seed per image", _generate_args,
                        "safeprune.recipes.generate:run"),
    "evaluate": Command("measure quality and concept suppression", _evaluate_args, "safeprune.recipes.evaluate:run"),
    "report": Command("tables, grids and curves from several runs", _report_args, "safeprune.recipes.report:run"),
    "demo": Command("the main job: prune, fine-tune 3 ways, evaluate, report", _demo_args,
                    "safeprune.recipes.demo:run"),
    "export": Command("export a model's denoiser to ONNX, checked and timed in onnxruntime", _export_args,
                      "safeprune.export:run"),
    "presets": Command("list the shipped presets (configs), or print one's path", _presets_args,
                       "safeprune.cli:run_presets"),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=None,
                   help="YAML file or shipped preset (e.g. sd21, concepts/nudity; see `safeprune presets`); repeatable, later files win; "
                        "a bare FILE.yaml word after the command does the same")
    p.add_argument("--seed", dest="seed", help="master seed")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in ONE line (and exits 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


EPILOG = "Any config value can be overridden as trailing section.field=value words, e.g. finetune.lr=1e-4."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safeprune", epilog=EPILOG,
                     description="Prune diffusion UNets, distill them, and suppress concepts (bilevel).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=EPILOG)
        cmd.arguments(p)
        if name != "toyworld":  # toyworld adds the common flags to each of its actions
            _common(p)
    return parser


def resolve(args: argparse.Namespace):
    """The run config: defaults <- --config <- flags <- positional overrides (later wins). Flags whose dest holds
    a dot are config keys (`--out` = paths.out); `--forget` fills finetune.concepts."""
    from safeprune.config import load_config, to_dict

    values = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    if getattr(args, "seed", None) is not None:
        values["seed"] = args.seed
    flags = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        node = flags
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value if key.startswith("paths.") or key in TEXT_FLAGS else _typed(value)
    if getattr(args, "forget", None):  # CLI concepts replace finetune.concepts
        from safeprune.unlearning.concepts import parse_forget

        flags.setdefault("finetune", {})["concepts"] = [to_dict(c) for c in parse_forget(args.forget)]
    configs = [ARCH_PRESETS[args.arch]] if getattr(args, "arch", None) else []
    return load_config([*configs, *(args.config or [])] or None, list(args.overrides), flags=flags)


# `demo --arch A`: the preset that puts the demo on toy teacher A (later --config files still win)
ARCH_PRESETS = {"unet": "toy", "dit": "toy_dit"}
TEXT_FLAGS = ("model.teacher", "eval.prompts", "eval.coco_dir", "eval.reference_set", "eval.images")  # never YAML-read


def _typed(value):
    """A flag's text as YAML reads it (`--ratio 0.5` is a number), except paths and prompts, which stay text."""
    from safeprune.config import parse_override

    return value if not isinstance(value, str) else parse_override(f"x={value}")[1]


def _in_given_order(argv: list[str], presets: list[str], flagged: list[str]) -> list[str]:
    """Config files as they appear on the command line, whether bare FILE.yaml words or --config values
    (`--config sd21 configs/concepts/nudity.yaml` must let nudity.yaml win, as the presets' comments say)."""
    ordered, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--config" and i + 1 < len(argv):
            ordered.append(argv[i + 1])
            i += 1
        elif word.startswith("--config="):
            ordered.append(word.split("=", 1)[1])
        elif word in presets:
            ordered.append(word)
        i += 1
    # anything argparse read differently (e.g. an abbreviated flag): bare words first, as before
    return ordered if sorted(ordered) == sorted([*presets, *flagged]) else [*presets, *flagged]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides are free-standing `key=value` words anywhere after the command (argparse cannot mix a
    # trailing variadic positional with sub-commands and options, so they are collected here).
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as stop:  # --help (0) or a one-line usage error (2): a code, as from every other path
        return stop.code
    args.overrides = [word for word in extra if "=" in word and not word.startswith("-")]
    presets = [word for word in extra if word.endswith((".yaml", ".yml")) and word not in args.overrides]
    # `safeprune finetune configs/sd21.yaml` = --config; later files win, in command-line order
    args.config = _in_given_order(sys.argv[1:] if argv is None else list(argv), presets, args.config or []) or None
    unknown = [word for word in extra if word not in args.overrides and word not in presets]
    if unknown:
        print(f"safeprune: error: unrecognized arguments: {' '.join(unknown)} (see `safeprune --help`)", file=sys.stderr)
        return 2
    try:
        import safeprune.runs
        from safeprune.config import to_dict
        from safeprune.errors import UserError

        safeprune.runs.current_command = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
        _quiet_libraries()
        try:
            cfg = resolve(args)
            # the user asked for the network (a hub-id teacher or a hub data set): lift our default
            wants_hub = cfg.model.allow_download or cfg.finetune.data.hub_data or getattr(args, "push_to_hub", None)
            if wants_hub and _OFFLINE_BY_DEFAULT:
                os.environ.pop("HF_HUB_OFFLINE", None)
                os.environ.pop("TRANSFORMERS_OFFLINE", None)
            if args.dry_run:
                print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
                if COMMANDS[args.command].describe:
                    module, func = COMMANDS[args.command].describe.split(":")
                    print(getattr(importlib.import_module(module), func)(cfg, args))
                return 0
            module, func = COMMANDS[args.command].target.split(":")
            result = getattr(importlib.import_module(module), func)(cfg, args)
            return int(result or 0)
        except (UserError, OSError, UnicodeDecodeError, RecursionError, MemoryError) as err:
            if args.debug:
                raise
            print(f"safeprune {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"safeprune {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """A UserError's own message; for the OS and the decoder, what went wrong and what to do, in one line."""
    from safeprune.errors import UserError

    if isinstance(err, UserError):
        return " ".join(str(err).split("\n"))
    if isinstance(err, OSError):  # read-only folder, full disk, permissions, a file where a folder should be
        if err.filename:
            return (f"cannot read or write {str(err.filename)!r}: {err.strerror or type(err).__name__}; check the "
                    "path, its permissions and the free disk space")
        return f"{(str(err) or type(err).__name__).splitlines()[0][:300]}; check the path and its permissions"
    if isinstance(err, UnicodeDecodeError):
        return f"an input text file is not UTF-8 (byte {err.start}: {err.reason}); save it as UTF-8"
    if isinstance(err, MemoryError):
        return "out of memory; lower the batch size, resolution or pool sizes"
    return "the input nests too deeply (e.g. a config file that includes itself); remove the cycle"


def _quiet_libraries() -> None:
    """One line per warning, and none for what is missing on purpose: transformers says once per image
    processor that it "requires torchvision" (never installed here), which would turn a one-line error into
    several lines."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # transformers logs it from this module's logger (a filter on a parent logger would not see the record)
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(getattr(f, "__name__", "") == "_no_torchvision" for f in logger.filters):
        logger.addFilter(_no_torchvision)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"safeprune: warning: {message}\n"


def _no_torchvision(record) -> bool:
    return "torchvision" not in record.getMessage()


if __name__ == "__main__":
    sys.exit(main())
