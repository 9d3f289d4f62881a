"""A bilevel step through the real `finetune` code path on a scaled-down SD 2.1 architecture.

Same block types and options as SD 2.1 (CrossAttn down blocks x3 + DownBlock2D, linear projections in the
transformers, per-stage head counts, v-prediction) at tiny widths, with the preset's memory options: teacher
in bf16 and gradient checkpointing of the student.
"""

import dataclasses
import json

import pytest
import torch

from safeprune.config import ChannelsOptions, load_config
from safeprune.errors import UserError
from safeprune.recipes.finetune import finetune

TINY_SD21 = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32, 32, 32), "attention_head_dim": (1, 2, 2, 2), "use_linear_projection": True,
    "cross_attention_dim": 64, "norm_num_groups": 4,
}


@pytest.fixture(scope="module")
def sd21_like(tmp_path_factory):
    """(teacher pipeline folder, channels-pruned student folder) of the tiny SD 2.1 architecture."""
    from safeprune.config import PruneConfig
    from safeprune.data.toyworld import ToyWorld
    from safeprune.models import toy
    from safeprune.models.io import save_unet
    from safeprune.pruning import prune

    root = tmp_path_factory.mktemp("sd21_like")
    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer(ToyWorld().vocabulary(), root / "tok")
    _, sampler = toy.build_schedulers("v_prediction")
    unet = toy.build_unet(**TINY_SD21)
    toy.assemble_pipeline(toy.build_vae(), toy.build_text_encoder(tokenizer), tokenizer, unet,
                          sampler).save_pretrained(root / "teacher")
    student, plan = prune(unet, "channels", PruneConfig(ratio=0.2, channels=ChannelsOptions(channel_multiple=4)))
    return root / "teacher", save_unet(student, root / "student", plan, base_model=root / "teacher")


def _paths(cfg, student, out, teacher):
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, student=str(student), out=str(out)),
                               model=dataclasses.replace(cfg.model, teacher=str(teacher)))


def test_bilevel_step_bf16_teacher_and_checkpointing(sd21_like, tmp_path, fast_flags):
    teacher, student = sd21_like
    cfg = load_config(None, [*fast_flags, "finetune.max_steps=2", "finetune.teacher_dtype=bf16",
                             "finetune.gradient_checkpointing=true", "model.prediction_type=v_prediction",
                             "finetune.resolution=64"])  # as SD: trained at another size than the toy images
    with pytest.warns(UserWarning, match="no --data / --concept-data given: fine-tuning a 64 px teacher"):
        out = finetune(_paths(cfg, student, tmp_path / "run", teacher))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upper_steps"] == 1 and len(summary["feature_blocks"]) == 9  # 4 down + mid + 4 up
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["lower/ft"])) for r in rows) and "upper/cu" in rows[-1]
    assert load_config(out / "config.yaml").model.teacher == str(teacher)  # the run records its teacher


def test_a_preset_prediction_type_must_match_the_teacher(sd21_like, tmp_path, fast_flags):
    teacher, student = sd21_like
    cfg = load_config(None, [*fast_flags, "finetune.max_steps=1", "model.prediction_type=epsilon"])
    with pytest.raises(UserError, match="predicts 'v_prediction'"):
        finetune(_paths(cfg, student, tmp_path / "run", teacher))
