"""BK-SDM tiny: the student's last down block is paired with the teacher's feature before its downsampler, as BK-SDM's
feature KD does (Nota-NetsPresso/BK-SDM src/kd_train_text_to_image.py, `bk_tiny` mapping), instead of being dropped."""

import json
from pathlib import Path

import torch

from safeprune.models import toy
from safeprune.models.hooks import capture_features, match_blocks
from safeprune.pruning.blocks import plan_blocks

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _meta_unet(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def test_sd15_tiny_pairs_are_bk_sdms():
    config = json.loads((ASSETS / "sd15_unet_config.json").read_text())
    teacher = _meta_unet(config)
    tiny = _meta_unet(plan_blocks(config, "tiny")[0])
    teacher_names, student_names = map(list, zip(*match_blocks(teacher, tiny)))
    # BK-SDM's mapping_layers_tea / mapping_layers_stu for bk_tiny, as sets (its lists are in another order)
    assert set(teacher_names) == {"down_blocks.0", "down_blocks.1", "down_blocks.2.attentions.1.proj_out",
                                  "up_blocks.1", "up_blocks.2", "up_blocks.3"}
    assert set(student_names) == {"down_blocks.0", "down_blocks.1", "down_blocks.2.attentions.0.proj_out",
                                  "up_blocks.0", "up_blocks.1", "up_blocks.2"}
    small = _meta_unet(plan_blocks(config, "small")[0])
    assert all(t == s and "." not in t.removeprefix("down_blocks.").removeprefix("up_blocks.")
               for t, s in match_blocks(teacher, small))  # whole blocks wherever both keep the downsampler


def test_toy_tiny_student_keeps_the_innermost_down_pair_in_feature_kd():
    from safeprune.config import BlocksOptions, PruneConfig
    from safeprune.models.hooks import match_features
    from safeprune.pruning import prune

    torch.manual_seed(0)
    teacher = toy.build_unet().eval()
    student, _ = prune(teacher, "blocks", PruneConfig(blocks=BlocksOptions(preset="tiny")))
    pair = ("down_blocks.1.attentions.1.proj_out", "down_blocks.1.attentions.0.proj_out")
    kept = match_features(teacher, student, torch.randn(6, 64))
    assert pair in kept and len(kept) == 4  # down 0, this pair, two up blocks
    x, t, emb = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 6, 64)
    with torch.no_grad(), capture_features(teacher, [pair[0]]) as tf, capture_features(student, [pair[1]]) as sf:
        teacher(x, t, encoder_hidden_states=emb)
        student(x, t, encoder_hidden_states=emb)
    assert tf[pair[0]].shape == sf[pair[1]].shape == (2, 64, 8, 8)  # stage 2, before the teacher downsamples
