"""Image-caption sources and the fixed latent / embedding pools."""

import json

import numpy as np
import pytest
import torch

from safeprune.data.datasets import (
    ImageFolder,
    LatentPool,
    ToySplit,
    embed_prompts,
    encode_pool,
    open_image_captions,
    pool_indices,
)
from safeprune.data.records import to_model_image
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError
from safeprune.utils import numpy_rng


@pytest.fixture(scope="module")
def pipe(random_teacher_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(random_teacher_dir, safety_checker=None, requires_safety_checker=False)


def test_toy_split_and_image_folder_agree(tmp_path):
    world = ToyWorld()
    world.export(tmp_path / "f", "finetune", 5)
    toy, folder = ToySplit(world, "finetune", 5, 32), open_image_captions(tmp_path / "f", world=world, split="x",
                                                                          n_toy=0, size=32)
    assert isinstance(folder, ImageFolder) and len(folder) == len(toy) == 5
    for i in range(5):
        a, b = toy[i], folder[i]
        assert a["text"] == b["text"] and a["labels"] == b["labels"]
        assert torch.allclose(a["image"], b["image"]) and a["image"].shape == (3, 32, 32)
        assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0


def test_images_are_centre_cropped_and_resized():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :10] = 255  # a white band that the centre crop removes
    out = to_model_image(image, 16)
    assert out.shape == (3, 16, 16) and torch.all(out == -1.0)


def test_bad_folders(tmp_path):
    world = ToyWorld()
    with pytest.raises(UserError, match="not found"):
        open_image_captions(tmp_path / "nope", world=world, split="finetune", n_toy=1, size=32)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="neither an image folder"):
        open_image_captions(tmp_path / "plain", world=world, split="finetune", n_toy=1, size=32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(UserError, match="metadata.jsonl:2 is not valid JSON"):
        ImageFolder(tmp_path / "bad", 32)
    (tmp_path / "bad" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="not in"):
        ImageFolder(tmp_path / "bad", 32)
    (tmp_path / "bad" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    with pytest.raises(UserError, match="caption column"):
        ImageFolder(tmp_path / "bad", 32)


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.fromarray(ToyWorld().sample("finetune", i)[0]) for i in range(3)]
    datasets.Dataset.from_dict({"image": images, "caption": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "hf"))
    data = open_image_captions(tmp_path / "hf", world=ToyWorld(), split="finetune", n_toy=0, size=32)
    assert len(data) == 3 and data[1]["text"] == "b" and data[1]["image"].shape == (3, 32, 32)


def test_pool_is_the_vae_latent_distribution(pipe):
    data = ToySplit(ToyWorld(), "finetune", 6, 32)
    pool = encode_pool(data, 6, pipe.vae, batch_size=4)
    images = torch.stack([data[i]["image"] for i in range(6)])
    dist = pipe.vae.encode(images).latent_dist
    sf = pipe.vae.config.scaling_factor
    assert torch.allclose(pool.mean, dist.mean * sf, atol=1e-5) and torch.allclose(pool.std, dist.std * sf, atol=1e-5)
    assert pool.captions == [data[i]["text"] for i in range(6)]
    idx, z = pool.draw(torch.Generator().manual_seed(0), 3)
    idx2, z2 = pool.draw(torch.Generator().manual_seed(0), 3)
    assert torch.equal(idx, idx2) and torch.equal(z, z2) and z.shape == (3, 4, 16, 16)


def test_pool_indices():
    assert pool_indices(5, 10, numpy_rng(0)) == [0, 1, 2, 3, 4]
    picked = pool_indices(100, 10, numpy_rng(0))
    assert len(set(picked)) == 10 and picked == sorted(picked) == pool_indices(100, 10, numpy_rng(0))


def test_prompt_embeddings_match_the_pipeline(pipe):
    prompts = ["a red circle", "", "striped style, a blue square"]
    ours = embed_prompts(prompts, pipe.tokenizer, pipe.text_encoder)
    theirs = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs.float())


def test_empty_pool_is_an_error():
    empty = LatentPool(torch.zeros(0, 4, 2, 2), torch.zeros(0, 4, 2, 2), [], [])
    assert len(empty) == 0
    with pytest.raises(UserError, match="empty"):
        encode_pool([], 4, vae=None)
