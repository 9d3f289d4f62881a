"""Min-SNR-gamma in both v-prediction forms: diffusers' min(SNR, g)/(SNR+1) and the paper code's min(SNR+1, g)/(SNR+1)."""

import pytest
import torch

from safeprune.config import load_config
from safeprune.errors import UserError
from safeprune.losses import DenoisingLoss, min_snr_weight
from safeprune.models import toy

SNR = torch.tensor([0.01, 0.5, 3.5, 4.0, 4.5, 20.0])


def test_the_two_forms_differ_only_for_v_prediction():
    diffusers = min_snr_weight(SNR, 5.0, "v_prediction", "diffusers")
    paper = min_snr_weight(SNR, 5.0, "v_prediction", "paper")
    torch.testing.assert_close(diffusers, torch.minimum(SNR, torch.tensor(5.0)) / (SNR + 1))
    torch.testing.assert_close(paper, torch.minimum(SNR + 1, torch.tensor(5.0)) / (SNR + 1))
    assert paper[0] == pytest.approx(1.0) and diffusers[0] == pytest.approx(0.01 / 1.01)  # low noise: weight 1
    assert torch.equal(paper[-1], diffusers[-1])  # both clip at gamma / (SNR + 1) for SNR + 1 >= gamma
    eps = [min_snr_weight(SNR, 5.0, "epsilon", w) for w in ("diffusers", "paper")]
    torch.testing.assert_close(eps[0], eps[1])
    torch.testing.assert_close(eps[0], torch.minimum(SNR, torch.tensor(5.0)) / SNR)


def test_the_loss_uses_the_configured_form():
    sched = toy.build_schedulers(prediction_type="v_prediction")[0]
    g = torch.Generator().manual_seed(0)
    pred, latents, noise = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([1, 10, 500, 999])
    plain = DenoisingLoss(sched, snr_gamma=0.0)(pred, latents, noise, t)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t)
    for form in ("diffusers", "paper"):
        got = DenoisingLoss(sched, 5.0, form)(pred, latents, noise, t)
        torch.testing.assert_close(got, plain * min_snr_weight(snr, 5.0, "v_prediction", form))
    assert not torch.allclose(DenoisingLoss(sched, 5.0, "paper")(pred, latents, noise, t),
                              DenoisingLoss(sched, 5.0, "diffusers")(pred, latents, noise, t))
    with pytest.raises(UserError, match="choose one of: diffusers, paper"):
        DenoisingLoss(sched, 5.0, "hang")


def test_config_choice_and_what_the_presets_use():
    assert load_config().finetune.snr_weighting == "diffusers"  # the toy teacher predicts epsilon: no difference
    assert load_config("sd21").finetune.snr_weighting == "paper"
    with pytest.raises(UserError, match="snr_weighting"):
        load_config(overrides=["finetune.snr_weighting=hang"])
