"""Concept ablation noises images of the ANCHOR distribution (seed paper eq. 5-6), not of the target concept."""

import numpy as np
import pytest

from safeprune.config import ToyWorldConfig, load_config
from safeprune.data.toyworld import ToyWorld
from safeprune.unlearning.anchors import ToyAnchorImages
from safeprune.unlearning.concepts import anchor_from_labels


@pytest.mark.parametrize("forbidden", [{"forbidden_styles": ["striped"]},
                                       {"forbidden_styles": [], "forbidden_shapes": ["cross"]}])
def test_toy_anchors_are_the_concept_images_without_the_concept(forbidden):
    world = ToyWorld(ToyWorldConfig(**forbidden), seed=3)
    anchors = ToyAnchorImages(world, 24, 32)
    styles = set()
    for i in range(24):
        _, caption, concept = world.sample("concept", i)
        item = anchors.record(i)
        labels = item["labels"]
        assert not world.is_forbidden(type(concept)(**labels))  # no forbidden attribute is drawn
        kept = [k for k in ("shape", "colour", "style") if getattr(concept, k) not in world.forbidden[k]]
        assert all(labels[k] == getattr(concept, k) for k in kept)  # the rest of the object is the concept image's
        assert item["text"] == anchor_from_labels(concept.as_dict(), world.forbidden)  # captioned with its anchor
        styles.add(labels["style"])
        assert np.array_equal(np.asarray(item["image"]), np.asarray(anchors.record(i)["image"]))  # pure in (seed, i)
    if forbidden["forbidden_styles"]:
        assert len(styles) >= 3  # the style-free anchor prompt covers the allowed styles, not one stand-in


@pytest.fixture(scope="module")
def teacher_pipe(random_teacher_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(random_teacher_dir, safety_checker=None,
                                                   requires_safety_checker=False)


@pytest.mark.parametrize("loss, images, noised", [("ablation", "", "anchor"), ("esd", "", "concept"),
                                                   ("esd_anchor", "anchor", "anchor"), ("ablation", "concept", "concept")])
def test_the_upper_pool_holds_anchor_images_for_ablation_or_when_asked(teacher_pipe, loss, images, noised):
    """By default only ablation noises anchor images; finetune.upper.images overrides the loss's choice."""
    from safeprune.bilevel.pools import build_pools
    from safeprune.unlearning import build_unlearning

    cfg = load_config(overrides=["finetune.data.pool=4", "finetune.data.concept_pool=8",
                                 f"finetune.upper.images={images}"])
    world = ToyWorld(cfg.toyworld, cfg.seed)
    pools, concepts = build_pools(cfg, teacher_pipe, build_unlearning(loss), None, None, "cpu")
    leaked = [world.is_forbidden(type(world.sample("concept", 0)[2])(**lab)) for lab in pools.concept.labels]
    assert not any(leaked) if noised == "anchor" else all(leaked)
    assert {c.target for c in concepts} == {world.sample("concept", i)[1] for i in range(8)}  # concepts unchanged
    # the embedding rows, as build_pools lays them out
    prompts = list(dict.fromkeys(["", *pools.lower.captions, *(c.target for c in concepts),
                                  *(c.anchor for c in concepts)]))
    for i in range(8):  # pool image i pairs with concept image i's target prompt, and its anchor prompt
        _, caption, labels = world.sample("concept", i)
        assert prompts[pools.concept_target[i]] == caption
        assert prompts[pools.concept_anchor[i]] == anchor_from_labels(labels.as_dict(), world.forbidden)
        if noised == "anchor":
            assert pools.concept.captions[i] == prompts[pools.concept_anchor[i]]


def test_image_folders_need_anchor_images_for_ablation(finetune_cli, tmp_path):
    ToyWorld().export(tmp_path / "concepts", "concept", 4)
    ToyWorld().export(tmp_path / "anchors", "finetune", 4)
    code, err = finetune_cli(tmp_path / "run", "--max-steps", "2", "--unlearn", "ablation",
                             "--concept-data", str(tmp_path / "concepts"))
    assert code == 2 and "--anchor-data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    code, err = finetune_cli(tmp_path / "run", "--max-steps", "2", "--unlearn", "ablation",
                             "--concept-data", str(tmp_path / "concepts"), "--anchor-data", str(tmp_path / "anchors"))
    assert code == 0, err
