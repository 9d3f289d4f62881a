"""Training transforms (deterministic, correct crop/flip) and the streaming loader (order, workers, resume)."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from safeprune.data.datasets import open_source
from safeprune.data.stream import ImageStream, _EpochSampler
from safeprune.data.transforms import train_image
from safeprune.utils import numpy_rng

pytest.importorskip("webdataset")
pytest.importorskip("datasets")


def _ramp(w, h):
    """An image whose red channel is the column index and green the row index (so crops are legible)."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def _pixels(t):
    return np.rint((t.permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)  # back to uint8 values


def test_centre_crop_and_flip_on_a_known_image():
    image = _ramp(24, 8)  # already 8 high: no resize at resolution 8, only the crop
    centre = _pixels(train_image(image, 8, random_crop=False, random_flip=False, rng=numpy_rng(0)))
    assert (centre[0, :, 0] == np.arange(8, 16)).all() and (centre[:, 0, 1] == np.arange(8)).all()
    for seed in range(20):  # the flip mirrors columns; a random crop is some 8-wide window of the ramp
        flipped = _pixels(train_image(image, 8, random_crop=False, random_flip=True, rng=numpy_rng(seed)))
        assert (flipped == centre).all() or (flipped == centre[:, ::-1]).all()
        crop = _pixels(train_image(image, 8, random_crop=True, random_flip=False, rng=numpy_rng(seed)))
        left = crop[0, 0, 0]
        assert 0 <= left <= 16 and (crop[0, :, 0] == np.arange(left, left + 8)).all()
    flips = [bool((_pixels(train_image(image, 8, random_crop=False, random_flip=True, rng=numpy_rng(s))) != centre)
                  .any()) for s in range(40)]
    assert 10 < sum(flips) < 30  # about half


def test_shorter_side_is_resized_like_torchvision():
    out = train_image(_ramp(60, 30), 16, random_crop=False, random_flip=False, rng=numpy_rng(0))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and -1 <= out.min() and out.max() <= 1
    tall = train_image(_ramp(30, 90), 10, random_crop=True, random_flip=True, rng=numpy_rng(1))
    assert tall.shape == (3, 10, 10)


def test_transforms_are_deterministic_under_a_seed():
    image = _ramp(40, 30)
    args = {"random_crop": True, "random_flip": True}
    a = train_image(image, 16, rng=numpy_rng(3, 1, "k"), **args)
    assert torch.equal(a, train_image(image, 16, rng=numpy_rng(3, 1, "k"), **args))
    others = [train_image(image, 16, rng=numpy_rng(s, 1, "k"), **args) for s in range(4, 10)]
    assert any(not torch.equal(a, b) for b in others)


def _batches(stream, n):
    return [stream.take(4) for _ in range(n)]


def _captions(batches):
    return sorted(itertools.chain.from_iterable(captions for _, captions in batches))


def _same(a, b):
    return all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_stream_order_is_seeded_and_resumable(kind, image_folder, shard_folder):
    source = open_source(image_folder if kind == "folder" else shard_folder)
    make = lambda **kw: ImageStream(source, batch_size=4, resolution=16, seed=7, shuffle_buffer=4, **kw)
    straight = _batches(make(), 6)  # 24 images = two epochs of 12
    assert straight[0][0].shape == (4, 3, 16, 16) and len(straight[0][1]) == 4
    assert _same(straight, _batches(make(), 6))
    assert _captions(straight[:3]) == _captions(straight[3:])  # epochs
    assert not _same(straight[:3], straight[3:])  # ... in a new order, with new crops
    resumed = make()
    resumed.seek(10)  # mid-batch: the stream continues at image 10
    tail = _batches(resumed, 3)
    flat = torch.cat([b[0] for b in straight])
    assert torch.equal(torch.cat([b[0] for b in tail]), flat[10:22]) and resumed.consumed == 22


def test_worker_processes_give_the_same_batches(image_folder, shard_folder):
    folder = open_source(image_folder)
    make = lambda w: ImageStream(folder, batch_size=4, resolution=16, seed=1, num_workers=w)
    assert _same(_batches(make(0), 4), _batches(make(2), 4))  # map-style: independent of the worker count
    shards = open_source(shard_folder)
    make = lambda: ImageStream(shards, batch_size=4, resolution=16, seed=1, num_workers=2)
    two = _batches(make(), 4)
    assert _same(two, _batches(make(), 4))  # iterable: reproducible for a given worker count
    assert _captions(two[:3]) == sorted(r["text"] for r in shards.records(0, 0, 0, 1, 0))


def test_ranks_split_each_epoch():
    first = [list(itertools.islice(_EpochSampler(10, 0, rank, 2, 0), 5)) for rank in range(2)]
    assert sorted(i for share in first for _, i in share) == list(range(10))  # epoch 0, no image twice
    later = list(itertools.islice(_EpochSampler(10, 0, 1, 2, 0), 7, 12))
    assert list(itertools.islice(_EpochSampler(10, 0, 1, 2, 7), 5)) == later  # resumed = continued
