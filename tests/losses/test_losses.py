"""Lower-level losses (eq. 1, 3, 4, 8) and the feature hooks."""

import pytest
import torch

from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss, OutputKD, min_snr_weight
from safeprune.models import toy
from safeprune.models.hooks import capture_features, feature_blocks, match_blocks


@pytest.fixture(scope="module")
def schedulers():
    return {kind: toy.build_schedulers(kind)[0] for kind in ("epsilon", "v_prediction")}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return toy.build_unet().eval()


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 4, 16, 16, generator=g)
    return latents, noise, torch.tensor([10, 250, 600, 990][:n]), torch.randn(n, 6, 64, generator=g)


def test_denoising_targets_and_zero_at_target(schedulers):
    latents, noise, t, _ = _batch()
    eps = DenoisingLoss(schedulers["epsilon"], snr_gamma=0)
    assert torch.equal(eps.target(latents, noise, t), noise)
    assert torch.all(eps(noise, latents, noise, t) == 0)
    v = DenoisingLoss(schedulers["v_prediction"], snr_gamma=0)
    a = schedulers["v_prediction"].alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v.target(latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6)
    per_sample = eps(torch.zeros_like(noise), latents, noise, t)
    assert per_sample.shape == (4,) and torch.allclose(per_sample, noise.square().flatten(1).mean(1))


def test_min_snr_weights(schedulers):
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    latents, noise, t, _ = _batch()
    pred = torch.zeros_like(noise)
    weighted = DenoisingLoss(schedulers["epsilon"], snr_gamma=5.0)(pred, latents, noise, t)
    plain = DenoisingLoss(schedulers["epsilon"], snr_gamma=0.0)(pred, latents, noise, t)
    assert torch.all(weighted <= plain + 1e-7) and weighted[0] < 0.1 * plain[0]  # low t (high SNR) down-weighted


def test_output_kd_zero_for_equal_and_gradient_points_to_teacher():
    teacher = torch.randn(3, 4, 8, 8)
    assert torch.all(OutputKD()(teacher.clone(), teacher) == 0)
    student = torch.zeros_like(teacher, requires_grad=True)
    OutputKD()(student, teacher).sum().backward()
    stepped = student - 0.1 * student.grad
    assert OutputKD()(stepped, teacher).sum() < OutputKD()(student, teacher).sum()
    assert torch.all(torch.sign(-student.grad) == torch.sign(teacher))  # descent moves toward the teacher


def test_student_equal_teacher_gives_zero_kd_terms(unet, schedulers):
    latents, noise, t, emb = _batch()
    pairs = tuple(match_blocks(unet, unet))
    loss = LowerLevelLoss(DenoisingLoss(schedulers["epsilon"]), FeatureKD(pairs))
    x_t = schedulers["epsilon"].add_noise(latents, noise, t)
    with torch.no_grad(), capture_features(unet, [p[0] for p in pairs]) as feats:
        out = unet(x_t, t, encoder_hidden_states=emb).sample
    terms = loss(out, out.clone(), latents, noise, t, feats, {k: v.clone() for k, v in feats.items()})
    assert len(pairs) == 7 and set(terms) == {"diff", "out_kd", "feat_kd", "ft"}
    assert torch.all(terms["out_kd"] == 0) and torch.all(terms["feat_kd"] == 0)
    assert torch.allclose(terms["ft"], terms["diff"])  # only L_diff is left (weights 1.0 / 2.0 / 0.1)


def test_lower_level_weights():
    sched = toy.build_schedulers()[0]
    latents, noise, t, _ = _batch()
    s, tt = torch.randn_like(noise), torch.randn_like(noise)
    feats_s, feats_t = {"b": torch.randn(4, 3, 2, 2)}, {"b": torch.randn(4, 3, 2, 2)}
    loss = LowerLevelLoss(DenoisingLoss(sched, 0.0), FeatureKD((("b", "b"),)), 1.0, 2.0, 0.1)
    terms = loss(s, tt, latents, noise, t, feats_s, feats_t)
    assert torch.allclose(terms["ft"], terms["diff"] + 2.0 * terms["out_kd"] + 0.1 * terms["feat_kd"])
    no_feat = LowerLevelLoss(DenoisingLoss(sched, 0.0), FeatureKD((("b", "b"),)), lambda_feat=0.0)
    assert "feat_kd" not in no_feat(s, tt, latents, noise, t)  # not captured when not weighted


def test_feature_kd_is_mean_of_block_mses():
    s = {"a": torch.zeros(2, 1, 2, 2), "b": torch.zeros(2, 1, 2, 2)}
    t = {"a": torch.ones(2, 1, 2, 2), "b": 3 * torch.ones(2, 1, 2, 2)}
    assert torch.allclose(FeatureKD((("a", "a"), ("b", "b")))(s, t), torch.tensor([5.0, 5.0]))  # (1 + 9) / 2


def test_hooks_capture_every_block_and_are_removed_even_on_error(unet):
    _, _, t, emb = _batch(2)
    names = feature_blocks(unet)
    assert names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                     "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    with torch.no_grad(), capture_features(unet, names) as feats:
        unet(torch.randn(2, 4, 16, 16), t[:2], encoder_hidden_states=emb[:2])
    assert [tuple(feats[n].shape) for n in names] == [
        (2, 32, 8, 8), (2, 64, 4, 4), (2, 64, 4, 4), (2, 64, 4, 4), (2, 64, 8, 8), (2, 64, 16, 16), (2, 32, 16, 16)]
    with pytest.raises(RuntimeError), capture_features(unet, names):
        unet(torch.randn(2, 3, 16, 16), t[:2], encoder_hidden_states=emb[:2])  # wrong channel count
    assert all(not m._forward_hooks for m in unet.modules())
    with pytest.raises(KeyError, match="no block"), capture_features(unet, ["down_blocks.9"]):
        pass


def test_feature_matching_after_block_removal(unet):
    """BK-SDM `small` (no mid block) and `tiny` (innermost stage gone): missing blocks are left out."""
    small = toy.build_unet(layers_per_block=1, mid_block_type=None)
    assert ("mid_block", "mid_block") not in match_blocks(unet, small)
    assert len(match_blocks(unet, small)) == 6
    tiny = toy.build_unet(layers_per_block=1, mid_block_type=None,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64))
    pairs = match_blocks(unet, tiny)
    # up blocks pair from the output side: the teacher's up_blocks.0 (innermost stage) has no partner;
    # the student's last down block (no downsampler) pairs before the teacher's downsampler (tests/science)
    assert pairs == [("down_blocks.0", "down_blocks.0"),
                     ("down_blocks.1.attentions.1.proj_out", "down_blocks.1.attentions.0.proj_out"),
                     ("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1")]
