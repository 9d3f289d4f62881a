"""Generation: image i depends only on (prompt_i, seed_i); the generate / concept-images / evaluate CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safeprune.cli import main
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError
from safeprune.recipes.generate import generate_images, read_prompts

PROMPTS = ["a red circle in striped style", "a plain blue square", "a drawing of a green cross, night style"]


def test_generation_is_deterministic_and_independent_of_batch_size_and_position(toy_pipe):
    seeds = [11, 12, 13]
    whole = generate_images(toy_pipe, PROMPTS, seeds, steps=3, guidance=5.0, batch_size=3, progress=False)
    assert whole.dtype == np.uint8 and whole.shape == (3, 32, 32, 3)
    again = generate_images(toy_pipe, PROMPTS, seeds, steps=3, guidance=5.0, batch_size=3, progress=False)
    assert np.array_equal(whole, again)
    one_by_one = generate_images(toy_pipe, PROMPTS, seeds, steps=3, guidance=5.0, batch_size=1, progress=False)
    reversed_ = generate_images(toy_pipe, PROMPTS[::-1], seeds[::-1], steps=3, guidance=5.0, batch_size=2,
                                progress=False)[::-1]
    # Batched CPU kernels may round differently in the last float bit: allow one grey level, nothing more.
    for other in (one_by_one, reversed_):
        assert np.abs(whole.astype(int) - other.astype(int)).max() <= 1
    other_seed = generate_images(toy_pipe, PROMPTS[:1], [99], steps=3, guidance=5.0, batch_size=1, progress=False)
    assert np.abs(other_seed[0].astype(int) - whole[0].astype(int)).mean() > 1  # the seed matters


def test_bf16_generation_is_deterministic_and_close_to_fp32(toy_pipe):
    seeds = [1, 2, 3]
    fp32 = generate_images(toy_pipe, PROMPTS, seeds, steps=3, batch_size=3, progress=False)
    bf16 = generate_images(toy_pipe, PROMPTS, seeds, steps=3, batch_size=3, progress=False, precision="bf16")
    again = generate_images(toy_pipe, PROMPTS, seeds, steps=3, batch_size=3, progress=False, precision="bf16")
    assert np.array_equal(bf16, again)
    assert np.abs(bf16.astype(int) - fp32.astype(int)).mean() < 3  # grey levels of 255
    with pytest.raises(UserError, match="precision"):
        generate_images(toy_pipe, PROMPTS, seeds, steps=1, progress=False, precision="fp8")


def test_read_prompts_from_toy_sets_and_files(tmp_path):
    world = ToyWorld(seed=0)
    assert len(read_prompts("toy:forget", world)) == 16
    path = tmp_path / "p.txt"
    path.write_text("# a comment\na red circle\n\n  a blue square  \n")
    assert read_prompts(str(path), world) == ["a red circle", "a blue square"]
    with pytest.raises(UserError, match="toy prompt set"):
        read_prompts("toy:nonsense", world)
    with pytest.raises(UserError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"), world)


def test_generate_cli_writes_images_prompts_and_grid(toy_pipe_dir, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(toy_pipe_dir), "--prompts", "toy:forget", "--seeds", "2",
                 "--out", str(out), "--steps", "2", "sample.batch_size=16"]) == 0
    lines = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 32 and {x["seed"] for x in lines} == {0, 1}
    assert all((out / x["file"]).is_file() for x in lines)
    assert (out / "grid.png").is_file() and (out / "config.yaml").is_file()


def test_concept_images_cli_writes_a_diffusers_image_folder(toy_pipe_dir, tmp_path):
    out = tmp_path / "concept"
    assert main(["concept-images", "--model", str(toy_pipe_dir), "--prompts", "a striped red circle",
                 "--prompts", "a striped blue cross", "--n", "2", "--out", str(out), "sample.steps=2"]) == 0
    meta = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == ["a striped red circle"] * 2 + ["a striped blue cross"] * 2
    assert all((out / m["file_name"]).is_file() for m in meta)


def test_evaluate_cli_writes_results(toy_pipe_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(toy_pipe_dir), "--reference", str(toy_pipe_dir), "--out", str(out),
                 "--metrics", "valid,leakage,cp", "sample.steps=2", "eval.seeds_per_prompt=1", "eval.max_prompts=2",
                 "eval.heldout=false"]) == 0
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert {"valid", "leakage", "forget_valid", "cp"} <= set(results)
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompts", "MISSING.txt"], "prompt file"),
    (["generate", "--prompts", "toy:nonsense"], "toy prompt set"),
    (["generate", "--prompts", "toy:forget", "--seeds", "0"], "--seeds"),
    (["generate", "--model", "NO_SUCH_DIR", "--prompts", "toy:forget"], "model folder"),
    (["evaluate", "--model", "NO_SUCH_DIR", "--metrics", "leakge"], "unknown metric"),
    (["evaluate", "--model", "NO_SUCH_DIR"], "model folder"),
    (["concept-images", "--model", "NO_SUCH_DIR", "--prompts", "a striped circle"], "model folder"),
    (["generate", "--prompts", "toy:forget", "sample.steps=0"], "sample.steps"),
])
def test_cli_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_refuses_a_non_empty_output_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["generate", "--prompts", "toy:forget", "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
