"""`safeprune finetune`: the other unlearning losses, which parameters they move, concepts and data sources."""

import json

import pytest
import torch
import yaml

from safeprune.checkpoint import load_checkpoint
from safeprune.models.io import load_unet
from safeprune.pruning import sparsity_masks


def test_ablation_on_a_magnitude_student_keeps_pruned_weights_at_zero(finetune_cli, tmp_path, magnitude_student):
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "4", "--unlearn", "ablation", student=magnitude_student)
    assert code == 0, err
    masks = sparsity_masks(load_unet(magnitude_student))
    tuned = load_unet(out).state_dict()
    assert masks and all(torch.all(tuned[name][~mask] == 0) for name, mask in masks.items())
    assert any(torch.any(tuned[name][mask] != load_unet(magnitude_student).state_dict()[name][mask])
               for name, mask in masks.items())


def test_esd_xattn_unlearning_moves_only_cross_attention(finetune_cli, tmp_path, student_dir):
    """two_stage with esd_xattn: between the end of distillation and the end, only attn2 weights change."""
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "2", "--method", "two_stage", "--unlearn", "esd_xattn",
                             "finetune.two_stage.unlearn_steps=2", "finetune.ckpt_every_steps=2", "finetune.keep_checkpoints=2")
    assert code == 0, err
    after_distill = load_unet(student_dir)
    load_checkpoint(out / "checkpoints" / "step_0000002", {"student": after_distill})
    before, after = after_distill.state_dict(), load_unet(out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2." in k for k in changed)


def test_forget_prompts_and_image_folders(finetune_cli, tmp_path):
    from safeprune.data.toyworld import ToyWorld

    ToyWorld().export(tmp_path / "data", "finetune", 6)
    ToyWorld().export(tmp_path / "concepts", "concept", 4)
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "2", "--unlearn", "ablation",
                             "--data", str(tmp_path / "data"), "--concept-data", str(tmp_path / "concepts"),
                             "--anchor-data", str(tmp_path / "data"),  # ablation noises anchor images
                             "--forget", "a striped red circle=>a red circle", "--forget", "striped style")
    assert code == 0, err
    concepts = [{"target": "a striped red circle", "anchor": "a red circle"}, {"target": "striped style", "anchor": ""}]
    assert json.loads((out / "concepts.json").read_text()) == concepts
    assert yaml.safe_load((out / "config.yaml").read_text())["finetune"]["concepts"] == concepts


def test_bf16_run_with_derived_toy_concepts(finetune_cli, tmp_path):
    """bf16 autocast for the student and a bf16 teacher, after fp32 runs in the same process."""
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "2", "finetune.mixed_precision=bf16", "finetune.teacher_dtype=bf16")
    assert code == 0, err
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["upper/cu"] > 0
    concepts = json.loads((out / "concepts.json").read_text())
    assert concepts and all("striped" in c["target"] and "striped" not in c["anchor"] for c in concepts)


def test_upper_lr_warms_up_over_upper_steps(finetune_cli, tmp_path):
    out = tmp_path / "run"
    code, err = finetune_cli(out, "--max-steps", "8", "finetune.upper.warmup_steps=2", "finetune.upper.lr=1e-3")
    assert code == 0, err
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    upper = [rec["lr/upper"] for rec in logs if "upper/cu" in rec]  # upper.every = 2 (FAST): 4 upper steps
    assert upper == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
