"""`safeprune finetune` end to end on a `channels`-pruned toy student: every method, few steps."""

import json

import pytest
import torch

from safeprune.cli import main
from safeprune.models.io import load_pipeline, load_unet

RUNS = {
    "distill": ["--method", "distill"],
    "two_stage": ["--method", "two_stage"],
    "alternating": ["--method", "bilevel", "--solver", "alternating"],
    "penalty": ["--method", "bilevel", "--solver", "penalty", "finetune.solver.penalty_lambda=10"],
}


@pytest.fixture(scope="module")
def student_weights(student_dir):
    return load_unet(student_dir).state_dict()


@pytest.mark.parametrize("name", list(RUNS))
def test_every_method_runs_and_the_run_folder_loads_and_samples(finetune_cli, tmp_path, student_weights, name):
    out = tmp_path / name
    code, err = finetune_cli(out, "--max-steps", "4", *RUNS[name])
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    upper = 0 if name == "distill" else 2  # K = 2: 4 // 2 upper steps; two_stage: M = 4 // 2 after distilling
    assert len(rows) == summary["steps"] == 4 + (2 if name == "two_stage" else 0)
    assert summary["upper_steps"] == upper and summary["world_size"] == 1
    assert sum("upper/cu" in r for r in rows) == upper
    assert all(r["lower/ft"] > 0 for r in rows if "lower/ft" in r)
    # passes counted in images: 2 per lower step, 2 per upper step, and 2 more per penalty outer step
    outer = upper if name == "penalty" else 0
    assert rows[-1]["student_bwd"] == 2 * 4 + 2 * upper + 2 * outer == summary["counts"]["student_bwd"]
    if name == "penalty":
        assert all("outer/gap" in r and r["outer/lambda"] == 10 for r in rows if "upper/cu" in r)
    assert list((out / "checkpoints").iterdir()) and list((out / "logs").rglob("events.out.tfevents.*"))
    # the run folder's model/ is a complete pipeline folder apart from the training state
    assert {"model", "checkpoints", "logs", "metrics.jsonl", "summary.json", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md"} <= {
        p.name for p in (out / "model").iterdir()}
    card = (out / "model" / "README.md").read_text()
    assert "## Suppressed concepts" in card and (name == "distill") == ("None: this model" in card)
    assert f"| method | {RUNS[name][1]} |" in card and summary["model"] == "model"
    pipe = load_pipeline(out)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
    tuned = pipe.unet.state_dict()
    assert tuned.keys() == student_weights.keys()
    assert any(not torch.equal(tuned[k], student_weights[k]) for k in tuned)


def test_config_yaml_alone_reproduces_the_run(finetune_cli, tmp_path):
    """Every input is in config.yaml (paths, teacher, concepts), so `--config RUN/config.yaml` reruns the run."""
    first = tmp_path / "first"
    assert finetune_cli(first, "--max-steps", "2", "--forget", "a striped red circle=>a red circle")[0] == 0
    again = tmp_path / "again"
    code = main(["finetune", "--config", str(first / "config.yaml"), "--out", str(again)])
    assert code == 0
    a, b = load_unet(first).state_dict(), load_unet(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c["target"] for c in json.loads((again / "concepts.json").read_text())] == ["a striped red circle"]
