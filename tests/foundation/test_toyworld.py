import json

import numpy as np
import pytest
from PIL import Image

from safeprune.config import ToyWorldConfig
from safeprune.data.toyworld import COLOURS, HELDOUT_TEMPLATES, SHAPES, STYLES, TRAIN_TEMPLATES, Labels, ToyWorld, draw
from safeprune.errors import UserError


def test_same_seed_same_bytes_and_seeds_differ():
    a, b, c = ToyWorld(seed=1), ToyWorld(seed=1), ToyWorld(seed=2)
    img_a, cap_a, lab_a = a.sample("pretrain", 17)
    img_b, cap_b, lab_b = b.sample("pretrain", 17)
    assert img_a.tobytes() == img_b.tobytes() and cap_a == cap_b and lab_a == lab_b
    assert any(c.sample("pretrain", i)[0].tobytes() != a.sample("pretrain", i)[0].tobytes() for i in range(3))


def test_batch_matches_samples():
    world = ToyWorld()
    images, captions, labels = world.batch("finetune", 5, 4)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert images[2].tobytes() == world.sample("finetune", 7)[0].tobytes() and captions[2] == world.sample("finetune", 7)[1]


def test_size_is_configurable():
    assert ToyWorld(ToyWorldConfig(size=48)).sample("pretrain", 0)[0].shape == (48, 48, 3)


def _object_colour(image: np.ndarray, style: str) -> np.ndarray:
    """Mean colour of the most saturated pixels: the object's paint in every style."""
    px = image.reshape(-1, 3).astype(float)
    saturation = px.max(1) - px.min(1)
    return px[saturation >= np.quantile(saturation, 0.95)].mean(0)


@pytest.mark.parametrize("style", STYLES)
def test_labels_match_pixels(style):
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], float)
    for shape in SHAPES:
        for colour in names:
            image = draw(Labels(shape, colour, style), rng)
            nearest = names[np.argmin(((palette - _object_colour(image, style)) ** 2).sum(1))]
            assert nearest == colour, (shape, colour, style)
            corner = image[0, 0].astype(int)
            assert (corner.sum() < 150) == (style == "night")  # night = dark sky; others white paper


def test_shapes_differ_in_area():
    rng = np.random.default_rng(0)
    ink = {s: [(draw(Labels(s, "red", "plain"), rng).min(-1) < 200).mean() for _ in range(20)] for s in SHAPES}
    # at one radius r: circle pi r^2 > square (1.64 r)^2 > cross 2.36 r^2 > triangle 1.75 r^2
    area = {s: np.mean(v) for s, v in ink.items()}
    assert area["circle"] > area["square"] > area["cross"] > area["triangle"]


def test_splits_respect_forbidden_concepts():
    world = ToyWorld(ToyWorldConfig(forbidden_styles=["night"], forbidden_colours=["blue"]))
    fine = [world.sample("finetune", i) for i in range(300)]
    assert not any(lab.style == "night" or lab.colour == "blue" for _, _, lab in fine)
    assert not any("night" in cap or "blue" in cap for _, cap, _ in fine)
    concept = [world.sample("concept", i)[2] for i in range(40)]
    assert all(lab.style == "night" or lab.colour == "blue" for lab in concept)
    pre = {world.sample("pretrain", i)[2].style for i in range(300)}
    assert pre == set(STYLES)


def test_prompt_sets():
    world = ToyWorld()
    forget, retain, neutral = world.prompts("forget"), world.prompts("retain"), world.prompts("neutral")
    assert len(forget) == 16 and all("striped" in p["prompt"] and p["forbidden"] for p in forget)
    assert len(retain) == 80 and not any("striped" in p["prompt"] for p in retain)
    assert all(p["style"] is None and p["colour"] in p["prompt"] for p in neutral)
    held = world.prompts("heldout_forget")
    train_forms = {t.split("{")[0] for t in TRAIN_TEMPLATES}
    assert all("striped" in p["prompt"] for p in held)
    assert not any(p["prompt"] in {q["prompt"] for q in forget} for p in held)
    assert set(HELDOUT_TEMPLATES).isdisjoint(TRAIN_TEMPLATES) and train_forms
    with pytest.raises(UserError):
        world.prompts("nosuch")


def test_unknown_forbidden_concept_is_a_user_error():
    with pytest.raises(UserError, match="glitter"):
        ToyWorld(ToyWorldConfig(forbidden_styles=["glitter"]))


def test_export_round_trip(tmp_path):
    world = ToyWorld()
    folder = world.export(tmp_path / "d", "concept", 6)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        image, caption, labels = world.sample("concept", i)
        assert np.array_equal(np.asarray(Image.open(folder / row["file_name"])), image)
        assert row["text"] == caption and row["style"] == labels.style == "striped"
