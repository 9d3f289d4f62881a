"""Upper-level losses (ESD, concept ablation, cross-attention-only ESD) and concept resolution."""

import pytest
import torch

from safeprune.config import Concept, UnlearnLossConfig
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError
from safeprune.models import toy
from safeprune.unlearning import UNLEARNING, build_unlearning, select_parameters
from safeprune.unlearning.concepts import anchor_from_labels, derive_concepts, pair_images, parse_forget


def _eps(seed):
    return torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_registry_and_unknown_name():
    assert set(UNLEARNING) == {"esd", "esd_xattn", "esd_anchor", "ablation"}
    esd = build_unlearning("esd", UnlearnLossConfig(eta=2.0))
    assert esd.eta == 2.0 and esd.params == "all" and build_unlearning("esd_xattn", UnlearnLossConfig()).params == "xattn"
    with pytest.raises(UserError, match="choose one of: ablation, esd, esd_anchor, esd_xattn"):
        build_unlearning("uce", UnlearnLossConfig())


def test_unlearn_params_overrides_the_losses_own_parameter_set():
    # finetune.unlearn.params=xattn turns esd_anchor into its cross-attention-only (ESD-x) variant, target unchanged
    own, xattn = (build_unlearning("esd_anchor", UnlearnLossConfig(params=p)) for p in ("", "xattn"))
    assert (own.params, xattn.params) == ("all", "xattn") and xattn.reference == own.reference == "anchor"
    assert build_unlearning("esd_xattn", UnlearnLossConfig(params="all")).params == "all"
    with pytest.raises(UserError, match="finetune.unlearn.params"):
        UnlearnLossConfig(params="attn1")


def test_esd_target_is_negative_guidance_and_gradient_moves_away_from_concept():
    esd = build_unlearning("esd", UnlearnLossConfig(eta=1.0))
    cond, null = _eps(0), _eps(1)
    target = esd.target({"target": cond, "null": null})
    assert torch.allclose(target, 2 * null - cond)  # null - eta (cond - null)
    # the target points away from the concept direction (cond - null)
    assert torch.sum((target - null) * (cond - null)) < 0
    # a student that copies the teacher on the concept (eps_S = cond) is pushed further from cond by descent
    student = cond.clone().requires_grad_(True)
    esd(student, target).sum().backward()
    stepped = student.detach() - 0.1 * student.grad
    assert (stepped - cond).norm() > 0 and torch.sum((stepped - cond) * (cond - null)) < 0
    # nothing to erase when the teacher ignores the concept: a teacher-equal student has zero loss
    assert torch.all(esd(null.clone(), esd.target({"target": null, "null": null})) == 0)


def test_esd_anchor_guides_away_relative_to_the_anchor_not_the_empty_prompt():
    esd = build_unlearning("esd_anchor", UnlearnLossConfig(eta=1.5))
    cond, anchor = _eps(0), _eps(1)
    assert esd.teacher_conditions == ("target", "anchor") and esd.params == "all"
    assert torch.allclose(esd.target({"target": cond, "anchor": anchor}), anchor - 1.5 * (cond - anchor))
    # what the anchor shares with the target (the object) is kept: if the concept adds nothing, target = anchor
    assert torch.equal(esd.target({"target": anchor, "anchor": anchor}), anchor)


def test_ablation_maps_the_concept_to_the_anchor():
    ablation = build_unlearning("ablation", UnlearnLossConfig())
    anchor = _eps(2)
    assert ablation.teacher_conditions == ("anchor",) and torch.equal(ablation.target({"anchor": anchor}), anchor)
    assert torch.all(ablation(anchor.clone(), anchor) == 0)
    student = _eps(3).requires_grad_(True)
    ablation(student, anchor).sum().backward()
    assert torch.all(torch.sign(-student.grad) == torch.sign(anchor - student.detach()))


def test_xattn_parameter_set_moves_only_cross_attention():
    unet = toy.build_unet()
    names = {id(p): n for n, p in unet.named_parameters()}
    xattn = select_parameters(unet, "xattn")
    assert xattn and all(".attn2." in f".{names[id(p)]}" for p in xattn)
    assert len(xattn) < len(select_parameters(unet, "all")) == len(list(unet.parameters()))
    no_attention = toy.build_unet(down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                                  mid_block_type=None)
    with pytest.raises(UserError, match="no parameters in set 'xattn'"):
        select_parameters(no_attention, "xattn")


def test_parse_forget():
    assert parse_forget(["a striped circle", "van gogh => a painting"]) == [
        Concept("a striped circle", ""), Concept("van gogh", "a painting")]
    with pytest.raises(UserError, match="empty target"):
        parse_forget(["=>a painting"])


def test_derived_toy_concepts_name_the_forbidden_style_and_anchor_without_it():
    world = ToyWorld()
    images = [world.sample("concept", i) for i in range(64)]
    captions, labels = [c for _, c, _ in images], [lab.as_dict() for _, _, lab in images]
    concepts, pairing = derive_concepts(captions, labels, world.forbidden)
    assert len(pairing) == 64 and len(concepts) <= 64
    for k, caption, lab in zip(pairing, captions, labels):
        assert concepts[k].target == caption and "striped" in caption
        assert concepts[k].anchor == anchor_from_labels(lab, world.forbidden)
        assert "striped" not in concepts[k].anchor and lab["shape"] in concepts[k].anchor
    assert anchor_from_labels({"shape": "circle", "colour": "red", "style": "striped"}, world.forbidden) == "a red circle"


def test_pairing_exact_caption_first_then_round_robin():
    concepts = [Concept("x"), Concept("y")]
    assert pair_images(concepts, ["y", "other", "x", "other", "other"]) == [1, 0, 0, 1, 0]
    with pytest.raises(UserError, match="no concepts"):
        pair_images([], ["x"])
