"""One record of an image-caption source, whatever the source: columns, image cells, the model's image.

A record is {"image": PIL RGB, "text": str, "labels": dict, "key": str}. Map-style sources (datasets.py)
and iterable ones (shards.py) build records with these helpers, so neither imports the other's module.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from safeprune.data.transforms import pil_to_tensor
from safeprune.errors import UserError, check

CAPTION_COLUMNS = ("text", "caption", "prompt")  # the first one a source has is its caption
LABEL_COLUMNS = ("shape", "colour", "style")  # optional toy-world labels, carried for evaluation


def to_model_image(image, size: int) -> torch.Tensor:
    """PIL image or uint8 array (H, W, 3) -> float tensor (3, size, size) in [-1, 1] (centre crop, bicubic)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return pil_to_tensor(image)


def to_pil(value, where: str):
    """An image cell as PIL RGB: a PIL image, encoded bytes, or a datasets {"bytes", "path"} dict."""
    if isinstance(value, dict):  # an Image column read without its feature type (e.g. a foreign parquet)
        value = value.get("bytes") or Path(value.get("path") or "").read_bytes()
    if isinstance(value, np.ndarray):
        return Image.fromarray(value).convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{where}: the image cannot be decoded ({err}); re-encode or drop that sample") from err
    check(hasattr(value, "convert"), f"{where}: the image column holds {type(value).__name__}, not an image")
    return value.convert("RGB")


@dataclass(frozen=True)
class Columns:
    """Which columns hold the image and the caption ("" = the defaults: file_name / image, text|caption|prompt)."""

    image: str = ""
    caption: str = ""


def caption_column(columns, where: str, wanted: str = "") -> str:
    """The caption column among `columns` (`wanted` when given), or a one-line error naming what is there."""
    if wanted:
        check(wanted in columns, f"{where} has no caption column {wanted!r} (--caption-column); it has "
                                 f"{sorted(columns)}")
        return wanted
    found = next((c for c in CAPTION_COLUMNS if c in columns), None)
    check(found is not None, f"{where} has no caption column ({', '.join(CAPTION_COLUMNS)}); it has {sorted(columns)}; "
                             "name yours with --caption-column")
    return found


def image_column(columns, where: str, wanted: str = "", default: str = "image") -> str:
    """The image column among `columns` (`wanted`, else `default`), or a one-line error naming what is there."""
    name = wanted or default
    check(name in columns, f"{where} has no `{name}` column (the image); it has {sorted(columns)}; name yours with "
                           "--image-column")
    return name
