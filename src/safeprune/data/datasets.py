"""Image-caption datasets for fine-tuning, and the fixed latent/embedding pools the training loop samples from.

Sources (`open_image_captions`):
  - the toy world's `finetune` / `concept` splits, streamed (image i is a pure function of (seed, split, i));
  - any image folder with a diffusers-style `metadata.jsonl` (`file_name`, `text`, optional label columns),
    e.g. one written by `safeprune toyworld export` or `safeprune concept-images`;
  - a Hugging Face `datasets` folder written by `save_to_disk` (needs the optional `datasets` package).

The loop never decodes images: `encode_pool` VAE-encodes a fixed pool once per run and keeps the latent
Gaussian (mean, std), so every step draws a fresh latent sample z = mean + std * n exactly as
`vae.encode(x).latent_dist.sample()` would, at the cost of one randn. Captions are embedded once per
unique text by the frozen text encoder (`embed_prompts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from safeprune.errors import UserError, check

CAPTION_COLUMNS = ("text", "caption", "prompt")
LABEL_COLUMNS = ("shape", "colour", "style")


def to_model_image(image, size: int) -> torch.Tensor:
    """PIL image or uint8 array (H, W, 3) -> float tensor (3, size, size) in [-1, 1] (centre crop, bicubic)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (S, S, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ToySplit(torch.utils.data.Dataset):
    """The first `n` images of a toy-world split; items {"image", "text", "labels"}."""

    def __init__(self, world, split: str, n: int, size: int):
        self.world, self.split, self.n, self.size = world, split, n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image, caption, labels = self.world.sample(self.split, i)
        return {"image": to_model_image(image, self.size), "text": caption, "labels": labels.as_dict()}


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images with `metadata.jsonl` lines {"file_name": ..., "text": ..., [label columns]}."""

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        meta = self.folder / "metadata.jsonl"
        check(meta.is_file(), f"image folder {str(self.folder)!r} has no metadata.jsonl; write one line "
                              '{"file_name": ..., "text": ...} per image (e.g. `safeprune toyworld export`)')
        self.records = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{meta}:{n} is not valid JSON ({err.msg}); fix or remove that line") from err
            caption = next((record[c] for c in CAPTION_COLUMNS if c in record), None)
            check("file_name" in record and isinstance(caption, str),
                  f"{meta}:{n} needs a `file_name` and a caption column ({', '.join(CAPTION_COLUMNS)})")
            self.records.append({"file_name": record["file_name"], "text": caption,
                                 "labels": {k: record[k] for k in LABEL_COLUMNS if k in record}})
        for record in self.records[:1]:  # a wrong folder usually fails on the first file already
            path = self.folder / record["file_name"]
            check(path.is_file(), f"{meta} names {record['file_name']!r}, which is not in {str(self.folder)!r}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        record = self.records[i]
        path = self.folder / record["file_name"]
        check(path.is_file(), f"image {str(path)!r} listed in metadata.jsonl is missing")
        with Image.open(path) as image:
            return {"image": to_model_image(image, self.size), "text": record["text"], "labels": record["labels"]}


class HFImageCaptions(torch.utils.data.Dataset):
    """A `datasets.Dataset` saved with `save_to_disk`: an `image` column and a caption column."""

    def __init__(self, folder: str | Path, size: int):
        try:
            import datasets
        except ImportError as err:
            raise UserError(f"{str(folder)!r} is a Hugging Face dataset folder; install the optional `datasets` "
                            "package, or export the data as an image folder with metadata.jsonl") from err
        data = datasets.load_from_disk(str(folder))
        if isinstance(data, datasets.DatasetDict):
            check("train" in data, f"dataset {str(folder)!r} has splits {list(data)} but no 'train' split")
            data = data["train"]
        self.caption = next((c for c in CAPTION_COLUMNS if c in data.column_names), None)
        check("image" in data.column_names and self.caption is not None,
              f"dataset {str(folder)!r} needs an `image` column and one of {', '.join(CAPTION_COLUMNS)}; "
              f"it has {data.column_names}")
        self.data, self.size = data, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[int(i)]
        labels = {k: row[k] for k in LABEL_COLUMNS if k in row}
        return {"image": to_model_image(row["image"], self.size), "text": row[self.caption], "labels": labels}


def open_image_captions(source: str | Path | None, *, world, split: str, n_toy: int, size: int):
    """The dataset at `source` (image folder or HF dataset folder), or the toy `split` when `source` is None."""
    if source is None:
        return ToySplit(world, split, n_toy, size)
    path = Path(source)
    check(path.is_dir(), f"data folder {str(path)!r} not found; pass an image folder with metadata.jsonl "
                         "or a Hugging Face dataset saved with save_to_disk")
    if (path / "metadata.jsonl").is_file():
        dataset = ImageFolder(path, size)
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = HFImageCaptions(path, size)
    else:
        raise UserError(f"{str(path)!r} is neither an image folder with metadata.jsonl nor a Hugging Face "
                        "dataset folder (dataset_info.json); point --data/--concept-data at one of those")
    check(len(dataset) > 0, f"dataset {str(path)!r} is empty; it needs at least one captioned image")
    return dataset


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


def pool_indices(length: int, n: int, seed: int) -> list[int]:
    """Which dataset items form a pool of n: all of them if they fit, else a seeded sample in index order."""
    if length <= n:
        return list(range(length))
    return sorted(np.random.default_rng(seed).choice(length, n, replace=False).tolist())


@torch.no_grad()
def encode_pool(dataset, n: int, vae, *, seed: int = 0, batch_size: int = 64, device="cpu") -> LatentPool:
    """VAE-encode up to `n` items of `dataset` once; keep the latent Gaussian (mean, std) of each."""
    indices = pool_indices(len(dataset), n, seed)
    check(bool(indices), "the dataset is empty; it needs at least one captioned image")
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds, captions, labels = [], [], [], []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        images = torch.stack([it["image"] for it in items]).to(device, vae.dtype)  # (b, 3, H, W) in [-1, 1]
        dist = vae.encode(images).latent_dist
        # z = (sample - shift) * scale, so mean and std transform the same way (std only by the scale).
        means.append(((dist.mean - shift) * scale).float())
        stds.append((dist.std * scale).float())
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
