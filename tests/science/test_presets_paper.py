"""The SD presets match the paper's code (rezashkv/unlearn-ft, configs/baselines/sd-2-1_coco_aptp_both_512_bilevel.yaml)
where they claim to: no weight decay, no gradient clipping, Min-SNR's v form, global batch 64 at both levels."""

import pytest

from safeprune.config import load_config


@pytest.mark.parametrize("preset", ["sd21", "sd15"])
def test_sd_presets_use_the_paper_codes_optimiser_settings(preset):
    ft = load_config(preset).finetune
    assert ft.weight_decay == 0.0 and ft.max_grad_norm == 0.0  # prediction_model_weight_decay 0.00; no clip_grad_norm
    assert ft.snr_weighting == "paper" and ft.snr_gamma == 5.0
    processes = 4  # the paper's GPUs
    assert ft.batch_size * processes * ft.grad_accum == 64
    assert ft.upper.batch_size * processes * ft.upper.grad_accum == 64  # the code's upper loader: train_batch_size
    assert load_config().finetune.weight_decay == 1e-2 and load_config().finetune.max_grad_norm == 1.0  # toy: unchanged
