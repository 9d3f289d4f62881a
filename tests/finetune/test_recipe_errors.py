"""Bad input to `safeprune finetune`: one line on stderr, exit 2, and no run folder left behind."""

import pytest

from safeprune.models import toy


@pytest.fixture(scope="module")
def mismatched_student(tmp_path_factory):
    """A UNet whose cross-attention expects 32-wide text embeddings (the teacher's are 64)."""
    from safeprune.models.io import save_unet

    return save_unet(toy.build_unet(cross_attention_dim=32), tmp_path_factory.mktemp("bad") / "unet", None)


@pytest.fixture(scope="module")
def empty_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("empty")
    (folder / "metadata.jsonl").write_text("")
    return folder


CASES = {
    "unknown method": (["--method", "magic"], "invalid choice: 'magic' (choose from 'distill'"),
    "unknown solver": (["--solver", "newton"], "invalid choice: 'newton'"),
    "unknown solver override": (["finetune.solver=newton"], "unknown bilevel solver 'newton'"),
    "unknown unlearning": (["--unlearn", "magic"], "invalid choice: 'magic'"),
    "unknown unlearning override": (["finetune.unlearn.name=magic"], "unknown unlearning loss 'magic'"),
    "moved key": (["finetune.esd_eta=1"], "moved to 'finetune.unlearn.eta'"),
    "missing student": (["--student", "{tmp}/nope"], "student folder"),
    "missing teacher": (["--teacher", "{tmp}/nope"], "is not a diffusers pipeline"),
    "mismatched student": (["--student", "{mismatched}"], "student and teacher do not match"),
    "empty dataset": (["--data", "{empty}"], "is empty"),
    "missing data": (["--data", "{tmp}/nope"], "data source"),
    "bad forget": (["--forget", "=>a painting"], "empty target"),
    "bad config": (["finetune.batch_size=0"], "finetune.batch_size must be > 0"),
    "resume without checkpoint": (["--resume"], "no checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(finetune_cli, tmp_path, mismatched_student, empty_folder, case):
    flags, message = CASES[case]
    flags = [f.format(tmp=tmp_path, mismatched=mismatched_student, empty=empty_folder) for f in flags]
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "2", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()


def test_an_existing_run_folder_is_not_overwritten(finetune_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = finetune_cli(out, "--max-steps", "2")
    assert code == 2 and "already exists" in err and (out / "precious.txt").read_text() == "keep me"
