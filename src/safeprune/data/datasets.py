"""Image-caption sources for fine-tuning, and the fixed latent/embedding pools the training loop samples from.

Sources (`open_source` / `open_image_captions`), chosen by what `--data` points at:
  - the toy world's `finetune` / `concept` splits (image i is a pure function of (seed, split, i));
  - an image folder with a diffusers-style `metadata.jsonl` or `metadata.csv` (`file_name`, `text`, optional
    label columns), e.g. one written by `safeprune toyworld export` or `safeprune concept-images`;
  - Hugging Face `datasets`: a folder written by `save_to_disk`, or parquet/arrow files (one file, a folder
    of them, or a glob) read with `load_dataset("parquet"|"arrow", data_files=...)`; with
    `finetune.data.streaming=true` they are read lazily as an `IterableDataset`; a hub dataset id only with
    `finetune.data.hub_data=true` (offline by default);
  - webdataset tar shards of image + caption (`shards/{000..009}.tar`, a folder of .tar files): see shards.py.

Column names: the image is `file_name` (folders) / `image` (tables), the caption the first of text / caption /
prompt; `Columns` (finetune.image_column / caption_column, --image-column / --caption-column) names others,
as diffusers' training scripts do.

Map-style sources (toy, folder, datasets) expose `record(i)`; iterable ones (shards, streaming datasets)
expose `records(...)` (shards.py). A record is {"image": PIL RGB, "text": str, "labels": dict, "key": str}.
Two consumers:
  - pool mode (the default at toy scale): `encode_pool` VAE-encodes a fixed pool once and keeps the latent
    Gaussian (mean, std), so every step draws a fresh latent z = mean + std * n exactly as
    `vae.encode(x).latent_dist.sample()` would, at the cost of one randn; captions are embedded once per
    unique text (`embed_prompts`). Iterable sources contribute their first `n` samples to a pool;
  - stream mode (real data sets): stream.py decodes, augments and VAE-encodes fresh images every step.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safeprune.data.records import (
    LABEL_COLUMNS,
    Columns,
    caption_column,
    image_column,
    to_model_image,
    to_pil,
)
from safeprune.data.shards import HFStream, ShardStream
from safeprune.errors import UserError, check
from safeprune.utils import HUB_ID, numpy_rng, read_text

TABLE_SUFFIXES = (".parquet", ".arrow")


class _Resized(torch.utils.data.Dataset):
    """Items {"image": (3, size, size) in [-1, 1], "text", "labels"} of a source with `record(i)`."""

    size: int

    def __getitem__(self, i: int) -> dict:
        record = self.record(i)
        return {"image": to_model_image(record["image"], self.size), "text": record["text"], "labels": record["labels"]}


class ToySplit(_Resized):
    """The first `n` images of a toy-world split."""

    def __init__(self, world, split: str, n: int, size: int):
        self.world, self.split, self.n, self.size = world, split, n, size

    def __len__(self) -> int:
        return self.n

    def record(self, i: int) -> dict:
        image, caption, labels = self.world.sample(self.split, i)
        return {"image": Image.fromarray(image), "text": caption, "labels": labels.as_dict(), "key": str(i)}


def metadata_file(folder: Path) -> Path | None:
    """An image folder's metadata: metadata.jsonl, else metadata.csv (the two formats diffusers' ImageFolder reads)."""
    return next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).is_file()), None)


def _metadata_rows(meta: Path):
    """(line number, record) of a metadata.jsonl / metadata.csv file."""
    if meta.suffix == ".csv":
        with open(meta, newline="") as f:
            yield from enumerate(csv.DictReader(f), 2)  # line 1 is the header
        return
    for n, line in enumerate(read_text(meta, "metadata file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{meta}:{n} is not valid JSON ({err.msg}); fix or remove that line") from err
        check(isinstance(record, dict), f"{meta}:{n} is not a JSON object; write one {{...}} object per line")
        yield n, record


class ImageFolder(_Resized):
    """A folder of images with `metadata.jsonl` lines {"file_name": ..., "text": ..., [label columns]}, or a
    `metadata.csv` with those columns."""

    def __init__(self, folder: str | Path, size: int, columns: Columns = Columns()):
        self.folder, self.size = Path(folder), size
        meta = metadata_file(self.folder)
        check(meta is not None, f"image folder {str(self.folder)!r} has no metadata.jsonl or metadata.csv; write one "
                                'line {"file_name": ..., "text": ...} per image (e.g. `safeprune toyworld export`)')
        self.records = []
        for n, record in _metadata_rows(meta):
            where = f"{meta}:{n}"
            file_column = image_column(record, where, columns.image, default="file_name")
            caption = record[caption_column(record, where, columns.caption)]
            check(isinstance(caption, str), f"{where}: the caption must be text, got {caption!r}")
            check(isinstance(record[file_column], str), f"{where}: {file_column} must be a file name, got "
                                                        f"{record[file_column]!r}")
            self.records.append({"file_name": record[file_column], "text": caption,
                                 "labels": {k: record[k] for k in LABEL_COLUMNS if k in record}})
        for record in self.records[:1]:  # a wrong folder usually fails on the first file already
            path = self.folder / record["file_name"]
            check(path.is_file(), f"{meta} names {record['file_name']!r}, which is not in {str(self.folder)!r}")

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> dict:
        record = self.records[i]
        path = self.folder / record["file_name"]
        check(path.is_file(), f"image {str(path)!r} listed in the folder's metadata is missing")
        return {"image": to_pil(path.read_bytes(), str(path)), "text": record["text"], "labels": record["labels"],
                "key": record["file_name"]}


class HFImageCaptions(_Resized):
    """A map-style `datasets.Dataset` (save_to_disk folder, parquet/arrow files): `image` + a caption column."""

    def __init__(self, data, name: str, size: int | None, columns: Columns = Columns()):
        self.caption = caption_column(data.column_names, f"dataset {name!r}", columns.caption)
        self.image = image_column(data.column_names, f"dataset {name!r}", columns.image)
        self.data, self.name, self.size = data, name, size

    def __len__(self) -> int:
        return len(self.data)

    def record(self, i: int) -> dict:
        row = self.data[int(i)]
        return {"image": to_pil(row[self.image], f"{self.name} row {i}"), "text": row[self.caption],
                "labels": {k: row[k] for k in LABEL_COLUMNS if k in row}, "key": str(i)}


def _table_files(source: str) -> tuple[str, list[str]]:
    """("parquet" | "arrow", files) for a file, a folder of them (recursively) or a glob pattern."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES)
    else:
        files = sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]
    check(bool(files) and all(Path(f).is_file() for f in files),
          f"no parquet/arrow files at {source!r}; pass a .parquet/.arrow file, a folder of them or a glob")
    return ("arrow" if files[0].endswith(".arrow") else "parquet"), files


def _open_hf(source: str, *, streaming: bool, hub: bool, columns: Columns = Columns()):
    """A `datasets` source: HFImageCaptions (map-style) or shards.HFStream (streaming=True)."""
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"data source {source!r} needs the optional `datasets` package: "
                        "pip install 'safeprune[data]'") from err
    path = Path(source)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                check("train" in data, f"dataset {source!r} has splits {list(data)} but no 'train' split")
                data = data["train"]
            data = data.to_iterable_dataset() if streaming else data
        elif hub:
            data = datasets.load_dataset(source, split="train", streaming=streaming)
        else:
            kind, files = _table_files(source)
            data = datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types (OSError, ValueError, its own); the user needs one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        check("corresponds to no data" not in first,  # what `datasets` says of a table with no rows
              f"dataset {source!r} is empty; it needs at least one captioned image")
        raise UserError(f"cannot read dataset {source!r}: {first}") from err
    if streaming:
        return HFStream(data, source, columns)
    check(len(data) > 0, f"dataset {source!r} is empty; it needs at least one captioned image")
    return HFImageCaptions(data, source, None, columns)


def is_shards(source: str) -> bool:
    """Whether `source` names webdataset shards: a .tar path or pattern, or a folder of .tar files."""
    path = Path(source)
    return source.endswith(".tar") or (path.is_dir() and any(path.glob("*.tar")))


def open_source(source: str | Path, *, streaming: bool = False, hub: bool = False, columns: Columns = Columns()):
    """The records behind `--data`: map-style (`record(i)`, len) or iterable (`records(...)`, see shards.py).
    `columns` names the image / caption columns of folders and tables (shards: by file extension)."""
    text, path = str(source), Path(source)
    if is_shards(text):
        return ShardStream(text)
    if path.is_dir() and metadata_file(path) is not None:
        return ImageFolder(path, None, columns)
    tables = path.suffix in TABLE_SUFFIXES or any(ch in text for ch in "*?[")
    if tables or any((path / n).is_file() for n in ("dataset_info.json", "dataset_dict.json")) \
            or any(p.suffix in TABLE_SUFFIXES for p in path.rglob("*") if path.is_dir()):
        return _open_hf(text, streaming=streaming, hub=False, columns=columns)
    check(not path.is_dir(), f"{text!r} is neither an image folder with metadata.jsonl, a Hugging Face dataset "
                             "folder (dataset_info.json), parquet/arrow files nor webdataset .tar shards; "
                             "point --data at one of those")
    if HUB_ID.match(text):
        check(hub, f"--data {text!r} is not a local path; if it is a Hugging Face hub dataset id, set "
                   "finetune.data.hub_data=true to download it (needs network), else fix the path")
        return _open_hf(text, streaming=streaming, hub=True, columns=columns)
    raise UserError(f"data source {text!r} not found; pass an image folder with metadata.jsonl, a Hugging Face "
                    "dataset folder, parquet/arrow files or webdataset shards (e.g. shards/{000..009}.tar)")


class _Items(torch.utils.data.Dataset):
    """The first `n` records of an iterable source, held in memory and resized (a pool's worth of images)."""

    def __init__(self, stream, n: int, size: int):
        self.items = []
        for record in stream.records(seed=0, epoch=0, rank=0, world=1, shuffle_buffer=0):
            if len(self.items) == n:
                break
            self.items.append({"image": to_model_image(record["image"], size), "text": record["text"],
                               "labels": record["labels"]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def open_image_captions(source: str | Path | None, *, world, split: str, n_toy: int, size: int,
                        streaming: bool = False, hub: bool = False, columns: Columns = Columns()):
    """Items {"image": (3, size, size), "text", "labels"} of `source`, or of the toy `split` when it is None.

    `n_toy` is the number of toy items, and the most an iterable source (shards, streaming) contributes.
    """
    if source is None:
        return ToySplit(world, split, n_toy, size)
    data = open_source(source, streaming=streaming, hub=hub, columns=columns)
    if not hasattr(data, "record"):  # iterable (shards, streaming): its first n samples
        data = _Items(data, n_toy, size)
    data.size = size
    check(len(data) > 0, f"dataset {str(source)!r} is empty; it needs at least one captioned image")
    return data


# ----------------------------------------------------------------------------- pools


@dataclass
class LatentPool:
    """A fixed set of VAE-encoded images: latent Gaussians, caption ids into an embedding table, labels."""

    mean: torch.Tensor  # (N, C, h, w), already scaled by the VAE's scaling factor
    std: torch.Tensor  # (N, C, h, w), likewise
    captions: list[str]
    labels: list[dict]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device) -> LatentPool:
        return LatentPool(self.mean.to(device), self.std.to(device), self.captions, self.labels)

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (n,), latent samples (n, C, h, w)) drawn with `generator` (CPU) and moved to the pool's device."""
        idx = torch.randint(len(self), (n,), generator=generator)
        eps = torch.randn((n, *self.mean.shape[1:]), generator=generator)
        idx_dev = idx.to(self.mean.device)
        return idx, self.mean[idx_dev] + self.std[idx_dev] * eps.to(self.mean.device)


def pool_indices(length: int, n: int, rng: np.random.Generator) -> list[int]:
    """Which dataset items form a pool of n: all of them if they fit, else a sample drawn with `rng`, in index
    order."""
    if length <= n:
        return list(range(length))
    return sorted(rng.choice(length, n, replace=False).tolist())


@torch.no_grad()
def latent_gaussian(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float, each (B, C, h, w), of the scaled latent of images (B, 3, H, W) in [-1, 1]."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # z = (sample - shift) * scale, so mean and std transform the same way (std only by the scale).
    return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()


@torch.no_grad()
def encode_pool(dataset, n: int, vae, *, rng: np.random.Generator | None = None, batch_size: int = 64,
                device="cpu") -> LatentPool:
    """VAE-encode up to `n` items of `dataset` once; keep the latent Gaussian (mean, std) of each.

    `rng` picks the pool when the dataset holds more than `n` items (default: `numpy_rng(0)`)."""
    indices = pool_indices(len(dataset), n, rng if rng is not None else numpy_rng(0))
    check(bool(indices), "the dataset is empty; it needs at least one captioned image")
    means, stds, captions, labels = [], [], [], []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        mean, std = latent_gaussian(vae, torch.stack([it["image"] for it in items]).to(device))
        means.append(mean)
        stds.append(std)
        captions += [it["text"] for it in items]
        labels += [it["labels"] for it in items]
    return LatentPool(torch.cat(means), torch.cat(stds), captions, labels)


@torch.no_grad()
def embed_prompts(prompts: list[str], tokenizer, text_encoder, *, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Text-encoder hidden states (P, L, D) of `prompts`, tokenised exactly as StableDiffusionPipeline does."""
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size], padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if use_mask else None
        out.append(text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float())
    return torch.cat(out)
