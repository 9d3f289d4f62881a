"""`safeprune unlearn` on pruned students, its one-line errors, and `finetune --method two_stage --unlearn NAME`."""

import json

import pytest
import torch
from unlearning_helpers import FORGET, TINY

from safeprune.cli import main
from safeprune.erasure import ERASURE
from safeprune.models.io import load_plan, load_unet
from safeprune.pruning import sparsity_masks

METHODS = tuple(ERASURE)  # the whole-model methods and every upper-level loss


@pytest.mark.parametrize("pruning", ["blocks", "channels", "magnitude"])
def test_every_method_runs_on_a_pruned_student(students, unlearn_cli, tmp_path, pruning):
    student = students[pruning]
    start = load_unet(student).state_dict()
    for method in METHODS:
        out = tmp_path / method
        code, err = unlearn_cli("--model", str(student), "--method", method, "--out", str(out), *FORGET)
        assert code == 0, f"{method}: {err}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == method and summary["concepts"] == 2
        erased = load_unet(out)  # loads back with the student's own architecture
        assert load_plan(out)["method"] == pruning and set(erased.state_dict()) == set(start)
        assert any(not torch.equal(v, start[k]) for k, v in erased.state_dict().items()), method
        if pruning == "magnitude":  # the pruned weights stay exactly zero whatever the method did
            for name, mask in sparsity_masks(load_unet(student)).items():
                assert torch.all(erased.state_dict()[name][~mask] == 0), (method, name)


def test_derived_toy_concepts_on_the_pipeline_itself(pipe_dir, unlearn_cli, tmp_path):
    out = tmp_path / "uce"
    code, err = unlearn_cli("--model", str(pipe_dir), "--method", "uce", "--out", str(out))
    assert code == 0, err
    concepts = json.loads((out / "concepts.json").read_text())
    assert concepts and all("striped" in c["target"] and "striped" not in c["anchor"] for c in concepts)
    assert (out / "model_index.json").is_file() and (out / "unet" / "plan.json").is_file()  # a whole pipeline
    from safeprune.models.io import load_pipeline

    assert load_pipeline(out).unet.config.cross_attention_dim == 64


@pytest.mark.parametrize("argv, words", [
    (["--method", "nope"], "invalid choice"),
    (["--method", "uce", "unlearn.method=nope"], None),
    (["--method", "uce", "--forget", ""], "empty target"),
    (["--method", "uce", "--forget", "=>a red circle"], "empty target"),
    (["--method", "uce", "unlearn.uce.tokens=all"], "unlearn.uce.tokens"),
    (["--method", "conceptprune", "unlearn.conceptprune.sparsity=0"], "sparsity"),
])
def test_bad_input_is_one_line_and_writes_nothing(pipe_dir, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    try:
        code = main(["unlearn", "--model", str(pipe_dir), "--out", str(out), *argv])
    except SystemExit as exit_:  # argparse's own choices check (cli._Parser: one line, exit 2)
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert words is None or words in err


def test_unknown_method_in_config_lists_the_valid_ones(pipe_dir, tmp_path, capsys):
    assert main(["unlearn", "--model", str(pipe_dir), "--out", str(tmp_path / "o"), "unlearn.method=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown erasure method 'nope'" in err and all(name in err for name in ("uce", "conceptprune", "esd_paper"))


def test_no_concepts_is_a_one_line_error(pipe_dir, tmp_path, capsys):
    code = main(["unlearn", "--model", str(pipe_dir), "--out", str(tmp_path / "o"), "toyworld.forbidden_styles=[]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--forget" in err


@pytest.mark.parametrize("method", ["uce", "esd_paper"])
def test_two_stage_distils_then_erases(pipe_dir, students, tmp_path, capsys, method):
    out = tmp_path / method
    argv = ["finetune", "--student", str(students["channels"]), "--teacher", str(pipe_dir), "--method", "two_stage",
            "--unlearn", method, "--max-steps", "4", "--out", str(out), "finetune.batch_size=2",
            "finetune.upper.batch_size=3", "finetune.data.pool=4", "finetune.warmup_steps=0", "finetune.upper.every=2",
            *FORGET, *TINY]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "two_stage" and summary["unlearn"] == method
    assert summary["erasure"]["method"] == method and load_plan(out)["erasure"][-1]["method"] == method
    if method == "esd_paper":  # matched budget: bilevel's 4 // 2 upper steps of 3 images each
        assert summary["erasure"]["steps"] == 2 and summary["erasure"]["batch_size"] == 3
        assert summary["counts"]["student_bwd"] == 4 * 2 + 2 * 3
    load_unet(out)
