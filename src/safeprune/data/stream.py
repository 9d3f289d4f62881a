"""Stream mode: fresh images every step, decoded and augmented by DataLoader workers, VAE-encoded per batch.

At Stable-Diffusion scale (20k steps x batch 64 = 1.3M images) a fixed pool of VAE latents is the wrong
design: it either holds a fraction of the data or more memory than the GPU has, and it freezes the random
crops and flips. Stream mode does what diffusers' train_text_to_image.py does instead:

    source records -> transforms.train_image (resize, crop, flip) in `num_workers` worker processes
    -> pinned (B, 3, R, R) batches -> VAE encode on the training device -> latents for this step,
    captions -> the family's text encoders (or the on-disk cache of text embeddings) -> this step's embeddings.

`StreamLatents` plugs into the loop where a fixed `LatentPool` would (`Pools.lower`): `draw(generator, n)`
returns (row indices, latent samples) with z = mean + std * eps and eps from the step's generator, and it
writes the batch's caption embeddings into rows it reserved in the run's embedding table (`attach`), so
`embeddings[lower_prompt[idx]]` in the problem picks this batch's captions. Concept images (the upper
level) stay a fixed pool: concept sets are small. Captions are conditioned exactly as the fixed table's prompts
are, by the family's own `backbone.encode` (safeprune.backbones): one CLIP's (n, L, D) states for SD 1.x/2.x,
a PromptEmbeddings (hidden, pooled, time_ids, mask) for SDXL, SD3, Flux and PixArt, every field of which
`draw` writes into the reserved rows.

Exact resume (checkpoints store `consumed`, the images this process has drawn):
  - map-style sources (image folder, datasets folder / parquet / arrow, toy): exact and cheap. The order is a
    seeded permutation per epoch (this rank takes every world-th entry) and a resumed sampler starts at
    `consumed`; augmentations depend only on (seed, epoch, index). Independent of num_workers.
  - iterable sources (webdataset shards, `streaming=true`): exact when num_workers and the process count are
    unchanged (the split across readers depends on them). Resuming reads and discards the consumed samples,
    which costs as long as loading them did the first time (a progress bar shows it).
  - the penalty solver re-evaluates L_ft on the batch of its last `lower` call (`lower_value`): draws are
    remembered by the generator state they were made with, so a replayed draw returns the same images.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from safeprune.backbones.base import PromptEmbeddings, cat_embeddings
from safeprune.data.datasets import ToySplit, is_shards, latent_gaussian, open_source
from safeprune.data.records import Columns
from safeprune.data.transforms import train_image
from safeprune.errors import UserError, check
from safeprune.utils import numpy_rng


def data_mode(ft, data) -> str:
    """`finetune.data.mode` resolved: auto = stream for iterable sources (shards, streaming=true), else pool."""
    if ft.data.mode != "auto":
        return ft.data.mode
    return "stream" if data is not None and (ft.data.streaming or is_shards(str(data))) else "pool"


# ----------------------------------------------------------------------------- pixel batches


class _MapImages(torch.utils.data.Dataset):
    """(pixels (3, R, R), caption) of a map-style source, indexed by (epoch, index) from `_EpochSampler`."""

    def __init__(self, source, augment: dict, seed: int):
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        record = self.source.record(i)
        return train_image(record["image"], rng=numpy_rng(self.seed, epoch, i), **self.augment), record["text"]


class _EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) forever: a seeded permutation per epoch, every world-th entry from `rank`, from `start`."""

    def __init__(self, n: int, seed: int, rank: int, world: int, start: int):
        check(n >= world, f"the dataset has {n} images, fewer than the {world} training processes")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start

    def __iter__(self):
        skip = self.start
        for epoch in itertools.count():
            share = numpy_rng(self.seed, epoch).permutation(self.n)[self.rank::self.world]
            if skip >= len(share):  # a resumed run jumps over whole epochs without touching an image
                skip -= len(share)
                continue
            for i in share[skip:]:
                yield epoch, int(i)
            skip = 0


class _StreamImages(torch.utils.data.IterableDataset):
    """(pixels (3, R, R), caption) of an iterable source, epoch after epoch, this reader's share."""

    def __init__(self, source, augment: dict, seed: int, rank: int, world: int, shuffle_buffer: int):
        self.source, self.augment, self.seed = source, augment, seed
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer

    def __iter__(self):
        for epoch in itertools.count():
            empty = True
            for record in self.source.records(self.seed, epoch, self.rank, self.world, self.shuffle_buffer):
                empty = False
                rng = numpy_rng(self.seed, epoch, record["key"])
                yield train_image(record["image"], rng=rng, **self.augment), record["text"]
            if empty:  # a reader with no share (more readers than shards of a streaming dataset) just stops
                return


def _collate(items):
    return torch.stack([pixels for pixels, _ in items]), [caption for _, caption in items]  # (B, 3, R, R), [B]


def _one_line(err: Exception) -> str:
    """A worker's UserError reaches the main process wrapped in its traceback; keep the message line."""
    text = str(err).strip().splitlines()
    return text[-1].split("UserError: ", 1)[-1] if "Original Traceback" in str(err) else (text or [""])[0]


class ImageStream:
    """Batches (pixels (B, 3, R, R) in [-1, 1], captions) of a source forever, from DataLoader workers."""

    def __init__(self, source, *, batch_size: int, resolution: int, random_crop: bool = True,
                 random_flip: bool = True, num_workers: int = 0, shuffle_buffer: int = 1000, seed: int = 0,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.source, self.batch_size, self.num_workers, self.pin_memory = source, batch_size, num_workers, pin_memory
        self.seed, self.rank, self.world, self.shuffle_buffer = seed, rank, world, shuffle_buffer
        self.augment = {"resolution": resolution, "random_crop": random_crop, "random_flip": random_flip}
        self.iterable = not hasattr(source, "record")  # map-style sources have record(i)
        self.consumed = 0  # images handed to training by this process (what a checkpoint records)
        self._batches, self._pending = None, []

    def seek(self, consumed: int) -> None:
        """Continue after `consumed` images (a resumed run); call before the first `take`."""
        check(self._batches is None, "ImageStream.seek must come before the first batch is taken")
        self.consumed = consumed

    def _loader(self):
        if self.iterable:
            dataset = _StreamImages(self.source, self.augment, self.seed, self.rank, self.world, self.shuffle_buffer)
            sampler = None
        else:
            dataset = _MapImages(self.source, self.augment, self.seed)
            sampler = _EpochSampler(len(self.source), self.seed, self.rank, self.world, self.consumed)
        workers = {"persistent_workers": True, "prefetch_factor": 4} if self.num_workers else {}
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                             num_workers=self.num_workers, collate_fn=_collate,
                                             pin_memory=self.pin_memory, **workers)
        batches = iter(loader)
        if self.iterable and self.consumed:  # same reader split and seeds: read past what was drawn before
            left = self.consumed
            with tqdm(total=left, desc="skipping consumed samples", unit="img", leave=False) as bar:
                while left:
                    pixels, captions = next(batches)
                    used = min(left, len(captions))
                    left -= used
                    bar.update(used)
                    self._pending = list(zip(pixels[used:], captions[used:]))
        return batches

    def take(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """The next n images (n, 3, R, R) and their captions."""
        try:
            if self._batches is None:
                self._batches = self._loader()
            while len(self._pending) < n:
                pixels, captions = next(self._batches)
                self._pending += list(zip(pixels, captions))
        except UserError as err:
            raise UserError(_one_line(err)) from err
        items, self._pending = self._pending[:n], self._pending[n:]
        self.consumed += n
        return torch.stack([pixels for pixels, _ in items]), [caption for _, caption in items]


# ----------------------------------------------------------------------------- text embeddings


def encoder_identity(tokenizer, text_encoder) -> str:
    """A hash of what decides an embedding: the encoder's config, the tokenizer, and a weight fingerprint.

    The fingerprint samples 64 values of every parameter (cheap even for CLIP-L/H or T5-XXL), with its dtype, so
    a fine-tuned, different or differently cast checkpoint of the same architecture gets its own cache.
    """
    h = hashlib.sha256()
    h.update(json.dumps(text_encoder.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.model_max_length}".encode())
    with torch.no_grad():
        for name, p in text_encoder.state_dict().items():
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy()
            h.update(name.encode() + str(tuple(p.shape)).encode() + str(p.dtype).encode() + sample.tobytes())
    return h.hexdigest()[:24]


def text_identity(backbone, pipe, resolution: int = 0) -> str:
    """A hash of what decides a family's conditioning of a caption: the family and its settings (e.g. T5
    sequence lengths), the pipeline class (PixArt-alpha and -sigma pad T5 differently), the resolution (SDXL's
    and PixArt's size conditioning) and `encoder_identity` of EVERY text encoder with its tokenizer (SDXL: two
    CLIPs; SD3: two CLIPs and an optional T5, whose absence is part of the key; Flux: CLIP and T5)."""
    h = hashlib.sha256(f"{backbone!r}|{type(pipe).__name__}|{resolution}".encode())
    components = pipe.components
    for name in sorted(k for k in components if k.startswith("text_encoder")):  # text_encoder, _2, _3
        encoder, tokenizer = components[name], components.get(name.replace("text_encoder", "tokenizer"))
        h.update(f"|{name}=".encode() + (b"absent" if encoder is None else encoder_identity(tokenizer, encoder).encode()))
    return h.hexdigest()[:24]


def _fields(emb) -> dict[str, torch.Tensor]:
    """The tensors of a conditioning by name: a plain (n, L, D) tensor (SD 1.x/2.x) is `embedding` (the cache's
    one-tensor layout), a PromptEmbeddings gives each field it has (hidden, pooled, time_ids, mask)."""
    if isinstance(emb, torch.Tensor):
        return {"embedding": emb}
    return {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb) if getattr(emb, f.name) is not None}


def _from_fields(tensors: dict[str, torch.Tensor]):
    """The inverse of `_fields`."""
    return tensors["embedding"] if "embedding" in tensors else PromptEmbeddings(**tensors)


class TextEmbeddings:
    """Caption -> its conditioning rows; optionally cached on disk as safetensors (never pickle).

    Cache layout: `folder/<encoder identity>/<2 hex>/<sha256 of the caption>.safetensors`, one tensor per field
    of the caption's conditioning (`embedding` for one CLIP's states; hidden, pooled, time_ids, mask for a
    PromptEmbeddings) with the caption in the file's metadata. Files are written to a temporary name and renamed,
    so concurrent processes (DDP ranks) and kills never leave a torn entry.
    """

    def __init__(self, backbone, pipe, *, device, folder: str | Path | None = None, resolution: int = 0):
        """The family's own conditioning, `backbone.encode(pipe, captions, device, resolution)`, as the run's fixed
        embedding table holds it (SD 1.x/2.x: one CLIP's (n, L, D) states), cached under `text_identity`."""
        self.encode = lambda captions: backbone.encode(pipe, captions, device, resolution)
        self.device = device
        self.folder = Path(folder) / text_identity(backbone, pipe, resolution) if folder else None
        self.encoded = 0  # captions run through the encoder (cache misses), for tests and logs

    def _path(self, caption: str) -> Path:
        key = hashlib.sha256(caption.encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def _save(self, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"caption": caption})
        os.replace(tmp, path)

    def __call__(self, captions: list[str]):
        """The conditioning of `captions` (n rows) on the device: as `encode` returns it."""
        found = {}  # caption -> {field: its row}
        if self.folder is not None:
            for caption in dict.fromkeys(captions):
                path = self._path(caption)
                if path.is_file():
                    found[caption] = {k: v.to(self.device) for k, v in load_file(str(path)).items()}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            embedded = _fields(self.encode(missing))
            self.encoded += len(missing)
            for i, caption in enumerate(missing):
                found[caption] = {k: v[i] for k, v in embedded.items()}
                if self.folder is not None:
                    self._save(caption, found[caption])
        return _from_fields({k: torch.stack([found[c][k] for c in captions]) for k in found[captions[0]]})


# ----------------------------------------------------------------------------- the pool the loop draws from


class StreamLatents:
    """Drop-in for a fixed LatentPool in `Pools.lower`: every draw is a fresh, VAE-encoded batch."""

    captions: tuple[str, ...] = ()  # no fixed captions: each draw fills the rows reserved by `attach`
    labels: tuple[dict, ...] = ()

    def __init__(self, images: ImageStream, vae, text: TextEmbeddings, *, device, replay: int = 2,
                 latent_shape: tuple[int, ...] | None = None):
        self.images, self.vae, self.text, self.device = images, vae, text, device
        self.slots = images.batch_size
        self.latent_shape = latent_shape  # (C, h, w) of one image's latents (the loop's shape check)
        self.table, self.first_row = None, 0
        self._recent = collections.OrderedDict()  # generator state -> (mean, std, embeddings), for replays
        self._replay = replay

    def attach(self, embeddings):
        """Reserve `slots` rows after the run's fixed prompts -> (embedding table, lower_prompt rows). The table
        is a (P, L, D) tensor or a PromptEmbeddings, as `embeddings` is; every field gets the reserved rows."""
        self.first_row = len(embeddings)
        reserved = _from_fields({k: v.new_zeros(self.slots, *v.shape[1:]) for k, v in _fields(embeddings).items()})
        self.table = cat_embeddings([embeddings, reserved])
        return self.table, torch.arange(self.first_row, self.first_row + self.slots)

    @torch.no_grad()
    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (n,), latent samples (n, C, h, w)): the next n images, or a replay of a draw made with the
        same generator state; also writes their caption embeddings (every field) into the reserved table rows."""
        check(self.table is not None and n <= self.slots, "StreamLatents.draw: attach() a table with >= n slots first")
        key = hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()
        if key not in self._recent:
            pixels, captions = self.images.take(n)
            mean, std = latent_gaussian(self.vae, pixels.to(self.device, non_blocking=True))
            self._recent[key] = (mean, std, self.text(captions))
            while len(self._recent) > self._replay:
                self._recent.popitem(last=False)
        mean, std, emb = self._recent[key]
        drawn = _fields(emb)
        for name, rows in _fields(self.table).items():  # in place: the problem indexes this very table
            rows[self.first_row:self.first_row + n] = drawn[name].to(rows.dtype)
        eps = torch.randn(mean.shape, generator=generator).to(self.device)
        return torch.arange(n), mean + std * eps

    def state_dict(self) -> dict:
        return {"consumed": self.images.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.images.seek(int(state["consumed"]))


def _rank_and_world() -> tuple[int, int]:
    """This process's place among the training processes (Accelerate has set up torch.distributed)."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def open_stream_pool(data, ft, *, world, pipe, backbone, vae, resolution: int, seed: int, device,
                     dtype=torch.float32) -> StreamLatents:
    """The stream-mode `Pools.lower` for `--data` (None = the toy finetune split) under FinetuneConfig `ft`, for a
    teacher pipeline `pipe` of family `backbone` (safeprune.backbones), whose own encoders condition the captions.

    The VAE and text encoders run every step here, so they take the teacher's `dtype` (as diffusers' training
    scripts cast them to the weight dtype); latents and embeddings come back as float32.
    """
    source = ToySplit(world, "finetune", ft.data.pool, resolution) if data is None else \
        open_source(data, streaming=ft.data.streaming, hub=ft.data.hub_data,
                    columns=Columns(ft.data.image_column, ft.data.caption_column))
    rank, processes = _rank_and_world()
    device = torch.device(device)
    images = ImageStream(source, batch_size=ft.batch_size, resolution=resolution, random_crop=ft.data.random_crop,
                         random_flip=ft.data.random_flip, num_workers=ft.data.num_workers, shuffle_buffer=ft.data.shuffle_buffer,
                         seed=seed, rank=rank, world=processes, pin_memory=device.type == "cuda")
    for name, module in pipe.components.items():  # every text encoder of the family (SD3's absent T5 is None)
        if name.startswith("text_encoder") and module is not None:
            module.to(device, dtype).eval()
    text = TextEmbeddings(backbone, pipe, device=device, folder=ft.data.text_cache or None, resolution=resolution)
    return StreamLatents(images, vae.to(device, dtype).eval(), text, device=device, replay=2 * ft.grad_accum,
                         latent_shape=backbone.latent_shape(pipe, resolution))
