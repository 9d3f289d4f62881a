"""CONTRIBUTING.md's worked examples, run as written: each new method is its file plus its registry entry,
and works through the existing code paths (the CLI, the saved form, the contracts) with nothing else added.

The examples are read from the markdown: the file of each method is executed as a module, and its registry
lines are evaluated in that module and put into the registry for the test only (monkeypatch)."""

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import safeprune.eval.toy as metrics_module
from safeprune.cli import main
from safeprune.config import Config, EvalConfig, PruneConfig, SampleConfig
from safeprune.data.toyworld import ToyWorld
from safeprune.eval.judge import load_judge
from safeprune.eval.metrics import METRICS, EvalContext, run_metrics
from safeprune.models import toy
from safeprune.models.io import load_pipeline, load_unet, save_unet
from safeprune.pruning import METHODS, prune
from safeprune.unlearning import UNLEARNING, build_unlearning

DOC = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)  # in order: file, registry lines, ...
EXAMPLES = {"pruning": BLOCKS[0:2], "unlearning": BLOCKS[2:4], "metric": BLOCKS[4:6]}


def _load(monkeypatch, name: str, source: str, namespace: dict | None = None) -> types.ModuleType:
    module = types.ModuleType(f"contributing_example_{name}")
    module.__dict__.update(namespace or {})
    module.__name__ = module.__dict__["__name__"] = f"contributing_example_{name}"
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(source, f"CONTRIBUTING.md:{name}", "exec"), module.__dict__)
    return module


def _register(monkeypatch, registry: dict, lines: str, module) -> str:
    """Evaluate the example's `"key": value,` entry in its module and add it to `registry`; returns the key."""
    (key, expr), = re.findall(r'^\s+"(\w+)": (.+?),\s*#', lines, re.M)
    for line in lines.splitlines():  # the import line names what the example file defines
        if line.startswith("from "):
            name = line.split(" import ")[1].strip()
            assert hasattr(module, name), f"the registry's import names {name}, which the example does not define"
    monkeypatch.setitem(registry, key, eval(expr, module.__dict__))
    return key


def test_the_document_holds_three_examples_and_their_counts():
    assert len(BLOCKS) == 6
    text = DOC.read_text()
    assert "**1 file + 2 lines**" in text and "**1 class + 1 line**" in text
    for name, (_, lines) in EXAMPLES.items():
        assert len(re.findall(r'^\s+"\w+": ', lines, re.M)) == 1, f"{name}: one registry entry"


def test_the_pruning_example_works_through_the_cli(monkeypatch, tmp_path, capsys):
    file, lines = EXAMPLES["pruning"]
    key = _register(monkeypatch, METHODS, lines, _load(monkeypatch, "pruning", file))
    torch.manual_seed(0)
    unet = toy.build_unet().eval()
    student, plan = prune(unet, key, PruneConfig(ratio=0.3))
    zeros = sum(int((p == 0).sum()) for p in student.parameters())
    assert plan["zeroed"] <= zeros and abs(plan["zeroed"] / sum(p.numel() for p in unet.parameters()) - 0.3) < 1e-3
    x = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 3, 64))
    loaded = load_unet(save_unet(student, tmp_path / "saved", plan))
    with torch.no_grad():
        assert torch.equal(loaded(*x).sample, student(*x).sample)
        assert torch.equal(prune(unet, key, PruneConfig(ratio=0.0))[0](*x).sample, unet(*x).sample)
    code = main(["prune", "--method", key, "--ratio", "0.2", "--out", str(tmp_path / "cli"), "prune.latency_runs=1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "cli" / "prune_report.json").read_text())
    assert report["method"] == key and report["ratio"] == 0.2 and report["params_stored_after"] > report["params_after"]


def test_the_unlearning_example_keeps_the_contract(monkeypatch):
    file, lines = EXAMPLES["unlearning"]
    key = _register(monkeypatch, UNLEARNING, lines, _load(monkeypatch, "unlearning", file))
    loss = build_unlearning(key)
    teacher = {c: torch.randn(2, 4, 8, 8, requires_grad=True) for c in loss.teacher_conditions}
    target = loss.target(teacher)
    assert torch.all(loss(target.detach().clone(), target) == 0)
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    value = loss(student, target)
    value.sum().backward()
    assert value.shape == (2,) and all(t.grad is None for t in teacher.values()) and student.grad is not None


def test_the_metric_example_runs_in_an_evaluation(monkeypatch, random_teacher_dir):
    file, lines = EXAMPLES["metric"]
    module = _load(monkeypatch, "metric", file, dict(vars(metrics_module)))  # a class inside metrics.py sees its names
    key = _register(monkeypatch, METRICS, lines, module)
    cfg = Config(eval=EvalConfig(max_prompts=3, seeds_per_prompt=1, heldout=False), sample=SampleConfig(steps=2))
    ctx = EvalContext(load_pipeline(random_teacher_dir), ToyWorld(cfg.toyworld, cfg.seed), cfg, load_judge())
    result = run_metrics(ctx, [key])
    assert result[key] > 0 and result[key] == pytest.approx(result[key]) and ctx.n_generated == 3
