"""Iterable image-caption sources: webdataset tar shards and streaming Hugging Face datasets.

Both expose `records(seed, epoch, rank, world, shuffle_buffer)`, an iterator over one epoch of THIS reader's
share of the data, each record {"image": PIL RGB, "text", "labels", "key"}. A reader is one DataLoader worker
of one process (rank); the split is deterministic, so the same (seed, epoch, world, num_workers) always
yields the same samples in the same order -- what exact resume of a streamed run relies on.

Shards (the webdataset format: a tar where files sharing a basename form a sample, `k.jpg` + `k.txt`):
  - the shard order is a seeded permutation per epoch; readers take every R-th shard (R = world x workers)
    when there are at least R shards, else every reader reads all shards and keeps every R-th sample;
  - samples pass a seeded shuffle buffer of raw bytes, and are decoded only after it (cheap buffer);
  - tar parsing is webdataset's (`tarfile_samples`); the shard split and shuffle are ours, because
    their seeding must be a pure function of (seed, epoch, reader) for exact resume.
Streaming datasets (`load_dataset(..., streaming=True)`): the dataset's own seeded `shuffle(buffer_size)` and
`set_epoch`; processes split with `split_dataset_by_node`, workers by `datasets` itself.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import torch

from safeprune.data.records import LABEL_COLUMNS, caption_column, image_column, to_pil
from safeprune.errors import UserError, check
from safeprune.utils import numpy_rng

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text")


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a folder of .tar files or a (brace) pattern such as `shards/{000..009}.tar`."""
    from webdataset.shardlists import expand_urls

    path = Path(pattern)
    shards = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_urls(pattern)
    check(bool(shards), f"no .tar shards at {pattern!r}; pass a folder of shards or a pattern like "
                        "shards/{000..009}.tar")
    for shard in shards:
        check(Path(shard).is_file(), f"shard {shard!r} (from {pattern!r}) not found; fix the pattern or the path")
        check(tarfile.is_tarfile(shard), f"shard {shard!r} is not a tar file (corrupt or truncated); "
                                         "rewrite it or leave it out of the pattern")
    return shards


def _reader() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _shuffled(items, buffer: int, rng):
    """A seeded shuffle buffer: keep `buffer` items, emit a random one as each new one arrives."""
    if buffer <= 1:
        yield from items
        return
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            yield pool.pop()
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


class ShardStream:
    """webdataset tar shards of image + caption (+ optional json labels)."""

    def __init__(self, pattern: str):
        self.pattern, self.shards = pattern, expand_shards(pattern)
        first = next(iter(self._raw(self.shards[:1])), None)
        check(first is not None, f"shard {self.shards[0]!r} holds no samples; webdataset shards need files "
                                 "like KEY.jpg + KEY.txt")
        self._decode(first)  # a missing caption or image fails here, before any worker starts

    def _raw(self, shards):
        """Undecoded samples {"__key__", "__url__", ext: bytes} of `shards` in order."""
        import webdataset as wds

        for shard in shards:
            try:
                yield from wds.tarfile_samples([{"url": shard}])
            except (tarfile.TarError, OSError, ValueError) as err:
                raise UserError(f"shard {shard!r} cannot be read ({type(err).__name__}: {err}); "
                                "rewrite it or leave it out of the pattern") from err

    def _decode(self, sample: dict) -> dict:
        where = f"shard {sample.get('__url__')!r} sample {sample.get('__key__')!r}"
        keys = sorted(k for k in sample if not k.startswith("__"))
        image = next((k for k in IMAGE_KEYS if k in sample), None)
        check(image is not None, f"{where} has no image ({', '.join(IMAGE_KEYS)}); it has {keys}")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caption = next((sample[k].decode() for k in CAPTION_KEYS if k in sample), None)
        except ValueError as err:  # bad JSON or a caption that is not UTF-8
            raise UserError(f"{where}: unreadable caption or json ({str(err).splitlines()[0][:120]}); rewrite it") from err
        check(isinstance(meta, dict), f"{where}: its .json is not a JSON object")
        if caption is None and meta:
            caption = meta[caption_column(meta, where)]
        check(isinstance(caption, str), f"{where} has no caption (.txt or a json caption field); it has {keys}")
        return {"image": to_pil(sample[image], where), "text": caption,
                "labels": {k: meta[k] for k in LABEL_COLUMNS if k in meta},
                "key": f"{Path(sample['__url__']).name}/{sample['__key__']}"}

    def records(self, seed: int, epoch: int, rank: int, world: int, shuffle_buffer: int):
        worker, workers = _reader()
        slot, slots = rank * workers + worker, world * workers
        shards = list(self.shards)
        if shuffle_buffer > 0:
            order = numpy_rng(seed, epoch).permutation(len(shards))
            shards = [shards[i] for i in order]
        if len(shards) >= slots:
            raw = self._raw(shards[slot::slots])
        else:  # fewer shards than readers: all read everything, each keeps its own every-R-th sample
            raw = itertools.islice(self._raw(shards), slot, None, slots)
        for sample in _shuffled(raw, shuffle_buffer, numpy_rng(seed, epoch, slot)):
            yield self._decode(sample)


class HFStream:
    """A streaming `datasets.IterableDataset` with an `image` column and a caption column."""

    def __init__(self, data, name: str, columns=None):
        self.data, self.name = data, name
        first = next(iter(data.take(1)), None)
        check(first is not None, f"dataset {name!r} is empty; it needs at least one captioned image")
        self.caption = caption_column(first, f"dataset {name!r}", columns.caption if columns else "")
        self.image = image_column(first, f"dataset {name!r}", columns.image if columns else "")

    def records(self, seed: int, epoch: int, rank: int, world: int, shuffle_buffer: int):
        from datasets.distributed import split_dataset_by_node

        data = self.data.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 0 else self.data
        data.set_epoch(epoch)
        if world > 1:
            data = split_dataset_by_node(data, rank=rank, world_size=world)
        worker, _ = _reader()
        for n, row in enumerate(data):
            yield {"image": to_pil(row[self.image], f"{self.name} row {n}"), "text": row[self.caption],
                   "labels": {k: row[k] for k in LABEL_COLUMNS if k in row}, "key": f"{rank}/{worker}/{n}"}
