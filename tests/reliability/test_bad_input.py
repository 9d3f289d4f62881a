"""Table-driven bad input to every command: exit 2, ONE line on stderr, no traceback, and no output folder that
looks valid (the --out path does not exist afterwards, or an existing file there is unchanged)."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

LATIN1 = "caf\xe9 cr\xe8me".encode("latin-1")  # not UTF-8


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, name, metadata: bytes, image=True):
    folder = root / name
    folder.mkdir()
    (folder / "metadata.jsonl").write_bytes(metadata)
    if image:
        (folder / "0.png").write_bytes(_png())
    return folder


def _shard(root, name, members: dict):
    path = root / f"{name}.tar"
    with tarfile.open(path, "w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher, student, unmatched_student):
    """Every bad file the table names, made once."""
    t = tmp_path_factory.mktemp("bad")
    (t / "afile").write_text("keep me")
    (t / "self.yaml").write_text("include: [self.yaml]\n")
    (t / "cycle_a.yaml").write_text("include: [cycle_b.yaml]\n")
    (t / "cycle_b.yaml").write_text("include: [cycle_a.yaml]\n")
    (t / "latin1.yaml").write_bytes(b"seed: 1 # " + LATIN1 + b"\n")
    (t / "list.yaml").write_text("- 1\n- 2\n")
    (t / "syntax.yaml").write_text("finetune: [\n")
    (t / "latin1.txt").write_bytes(LATIN1 + b"\n")
    (t / "empty.txt").write_text("# only a comment\n")
    (t / "bad.json").write_text("{not json")
    ok = b'{"file_name": "0.png", "text": "a red circle"}\n'
    data = {
        "meta_latin1": _folder(t, "meta_latin1", b'{"file_name": "0.png", "text": "' + LATIN1 + b'"}\n'),
        "meta_not_json": _folder(t, "meta_not_json", ok + b"{oops\n"),
        "meta_list": _folder(t, "meta_list", b"[1, 2]\n"),
        "meta_name_int": _folder(t, "meta_name_int", b'{"file_name": 5, "text": "a"}\n'),
        "meta_no_caption": _folder(t, "meta_no_caption", b'{"file_name": "0.png"}\n'),
        "meta_missing_image": _folder(t, "meta_missing_image", ok, image=False),
        "meta_empty": _folder(t, "meta_empty", b""),
        "shard_json": _shard(t, "shard_json", {"k0.png": _png(), "k0.json": b"{oops"}),
        "shard_latin1": _shard(t, "shard_latin1", {"k0.png": _png(), "k0.txt": LATIN1}),
    }
    runs = {}
    for name, files in {"ok": {"results.json": b'{"metrics": {"leakage": 0.5}}'},
                        "results_json": {"results.json": b"{oops"}, "results_list": {"results.json": b"[1]"},
                        "metrics_list": {"results.json": b'{"metrics": [1]}'}, "results_latin1": {"results.json": LATIN1},
                        "summary_json": {"results.json": b'{"metrics": {}}', "summary.json": b"{oops"}}.items():
        runs[name] = t / "runs" / name
        runs[name].mkdir(parents=True)
        for file, content in files.items():
            (runs[name] / file).write_bytes(content)
    clip = t / "clip"  # a CLIP folder holding only a pickle: must never be loaded
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (clip / "pytorch_model.bin").write_bytes(b"not loaded")
    return {"t": t, "file": t / "afile", "teacher": teacher, "student": student, "unmatched": unmatched_student,
            "clip": clip, **data, **{f"run_{k}": v for k, v in runs.items()}}


FT = "finetune --student {student} --teacher {teacher} --max-steps 2 finetune.data.pool=4 finetune.data.concept_pool=4"
CASES = {
    # --out (or the export folder) is an existing file: every command
    "preview out file": ("toyworld preview --out {file}", "is an existing file"),
    "export out file": ("toyworld export {file} --n 2", "is an existing file"),
    "pretrain teacher out file": ("pretrain teacher --out {file}", "is an existing file"),
    "pretrain judge out file": ("pretrain judge --out {file}", "is an existing file"),
    "prune out file": ("prune --out {file}", "is an existing file"),
    "finetune out file": (FT + " --out {file}", "is an existing file"),
    "concept-images out file": ("concept-images --prompts x --n 1 --out {file}", "is an existing file"),
    "generate out file": ("generate --prompts toy:forget --out {file}", "is an existing file"),
    "evaluate out file": ("evaluate --metrics valid --out {file}", "is an existing file"),
    "report out file": ("report {run_ok} --out {file}", "is an existing file"),
    "demo out file": ("demo --out {file}", "is an existing file"),
    "out under a file": ("toyworld preview --out {file}/sub", "is a file"),
    # seeds and config files
    "seed float": ("toyworld preview --out {out} --seed 1e23", "has the wrong type"),
    "seed huge": ("toyworld preview --out {out} --seed 100000000000000000000000", "out of range"),
    "yaml includes itself": ("toyworld preview --out {out} --config {t}/self.yaml", "includes itself"),
    "yaml include cycle": ("toyworld preview --out {out} --config {t}/cycle_a.yaml", "includes itself"),
    "yaml not utf-8": ("toyworld preview --out {out} --config {t}/latin1.yaml", "not UTF-8"),
    "yaml a list": ("toyworld preview --out {out} --config {t}/list.yaml", "must hold a mapping"),
    "yaml syntax": ("toyworld preview --out {out} --config {t}/syntax.yaml", "not valid YAML"),
    "yaml missing": ("toyworld preview --out {out} --config {t}/nope.yaml", "not found"),
    "unknown key": ("toyworld preview --out {out} finetune.nope=1", "unknown config key"),
    "wrong type": ("toyworld preview --out {out} finetune.lr=abc", "has the wrong type"),
    # values that can only be mistakes
    "guidance inf": ("generate --prompts toy:forget --out {out} sample.guidance=inf", "must lie in [0, 100]"),
    "guidance nan": ("generate --prompts toy:forget --out {out} sample.guidance=nan", "must lie in [0, 100]"),
    "guidance 1000": ("generate --prompts toy:forget --out {out} --guidance 1000", "must lie in [0, 100]"),
    "sample steps huge": ("generate --prompts toy:forget --out {out} sample.steps=100000", "implausibly large"),
    "resolution huge": (FT + " --out {out} finetune.resolution=1000000", "implausibly large"),
    "batch huge": (FT + " --out {out} finetune.batch_size=10000000", "implausibly large"),
    "max steps huge": (FT + " --out {out} --max-steps 10000000000000", "implausibly large"),
    "lr inf": (FT + " --out {out} finetune.lr=inf", "must be a finite number"),
    "upper lr nan": (FT + " --out {out} finetune.upper.lr=nan", "finetune.upper.lr"),
    "weight growth": (FT + " --out {out} finetune.max_weight_growth=0.5", "must be > 1"),
    "demo seeds 0": ("demo --out {out} --seeds 0", "must lie in 1..1000"),
    "teacher lr inf": ("pretrain teacher --out {out} teacher.lr=inf", "must be a finite number"),
    "memory": (FT + " --out {out} finetune.batch_size=60000", "estimated peak"),
    # prompt files
    "prompts not utf-8": ("generate --prompts {t}/latin1.txt --out {out}", "not UTF-8"),
    "prompts empty": ("generate --prompts {t}/empty.txt --out {out}", "holds no prompts"),
    "prompts missing": ("generate --prompts {t}/nope.txt --out {out}", "not found"),
    # image folders, shards
    "captions not utf-8": (FT + " --out {out} --data {meta_latin1}", "not UTF-8"),
    "metadata line not json": (FT + " --out {out} --data {meta_not_json}", "is not valid JSON"),
    "metadata line a list": (FT + " --out {out} --data {meta_list}", "is not a JSON object"),
    "metadata file_name int": (FT + " --out {out} --data {meta_name_int}", "must be a file name"),
    "metadata no caption": (FT + " --out {out} --data {meta_no_caption}", "has no caption column"),
    "metadata missing image": (FT + " --out {out} --data {meta_missing_image}", "which is not in"),
    "metadata empty": (FT + " --out {out} --data {meta_empty}", "is empty"),
    "concept captions not utf-8": (FT + " --out {out} --concept-data {meta_latin1} finetune.upper.every=1", "not UTF-8"),
    "shard bad json": (FT + " --out {out} --data {shard_json}", "unreadable caption or json"),
    "shard caption not utf-8": (FT + " --out {out} --data {shard_latin1}", "unreadable caption or json"),
    # report inputs
    "results bad json": ("report {run_results_json} --out {out}", "is not valid JSON"),
    "results a list": ("report {run_results_list} --out {out}", "holds a list"),
    "results metrics a list": ("report {run_metrics_list} --out {out}", "`metrics` is not a JSON object"),
    "results not utf-8": ("report {run_results_latin1} --out {out}", "not UTF-8"),
    "summary bad json": ("report {run_summary_json} --out {out}", "is not valid JSON"),
    "report run missing": ("report {t}/nope --out {out}", "not found"),
    # finetune flags and folders
    "resume and overwrite": (FT + " --out {out} --resume --overwrite", "not both"),
    "resume nothing": (FT + " --out {out} --resume", "no run to resume"),
    "student a file": ("finetune --student {file} --teacher {teacher} --out {out}", "student folder"),
    "unknown method": (FT + " --out {out} --method magic", "invalid choice"),
    "no feature blocks": ("finetune --student {unmatched} --teacher {teacher} --out {out}", "no block of the student"),
    # prune, export, evaluate, concept images, argparse
    "unet config bad json": ("prune --unet-config {t}/bad.json --out {out}", "is not valid JSON"),
    "ratio out of range": ("prune --ratio 1.5 --out {out}", "out of range"),
    "prune model missing": ("prune --model {t}/nope --out {out}", "nope"),
    "prune a pruned model": ("prune --model {student} --out {out}", "already pruned"),
    "export n 0": ("toyworld export {out} --n 0", "at least one image"),
    "concept-images n 0": ("concept-images --prompts x --n 0 --out {out}", "at least one image"),
    "unknown metric": ("evaluate --metrics nope --out {out}", "unknown metric"),
    "argparse choice": ("pretrain bogus --out {out}", "invalid choice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(cli, inputs, tmp_path, case):
    command, message = CASES[case]
    out = tmp_path / "out"
    argv = [word.format(out=out, **inputs) for word in command.split()]
    before = inputs["file"].read_text()
    code, err = cli(*argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not out.exists() and inputs["file"].read_text() == before
    assert not list(tmp_path.glob(".*"))  # no lock or temporary left next to it either


def test_the_table_covers_at_least_50_cases():
    assert len(CASES) >= 50


def test_a_clip_folder_with_only_a_pickle_is_refused_without_unpickling(inputs):
    from transformers import CLIPModel

    from safeprune.errors import UserError
    from safeprune.eval.extractors import _safetensors_only

    with pytest.raises(UserError, match="safetensors"):  # "not loaded" is no pickle: unpickling would fail otherwise
        _safetensors_only(CLIPModel, inputs["clip"])
