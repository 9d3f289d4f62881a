"""Reference sets of the distribution metrics (FID, CMMD): real images to compare generated ones with.

  an image folder (COCO val2017: only the images whose captions were drawn, or every image in it),
  a `datasets` table (a saved dataset folder, or parquet / arrow files) with an image column,
  precomputed feature statistics (`.npz` with `mu` and `sigma`, clean-fid's format; FID only).
Images are resized (shorter side, bicubic) and centre-cropped to the generation size, as the paper's protocol does
before clean-fid's own resize to 299.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safeprune.errors import UserError, check

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def resize_centre_crop(image, size: int) -> np.ndarray:
    """uint8 (size, size, 3): shorter side to `size` (bicubic), then the central square."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


@dataclass(frozen=True)
class ImageFiles:
    """Real images from files."""

    files: tuple[Path, ...]

    def batches(self, size: int, batch_size: int = 64) -> Iterator[np.ndarray]:
        from PIL import Image

        for i in range(0, len(self.files), batch_size):
            yield np.stack([resize_centre_crop(Image.open(f), size) for f in self.files[i:i + batch_size]])

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class DatasetImages:
    """Real images from a `datasets` table column."""

    path: str
    column: str = "image"

    def _table(self):
        from datasets import load_dataset, load_from_disk

        path = Path(self.path)
        if path.is_dir() and (path / "dataset_info.json").is_file():
            return load_from_disk(str(path))
        files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [str(path)]
        kind = "arrow" if files and files[0].endswith(".arrow") else "parquet"
        return load_dataset(kind, data_files=files, split="train")

    def batches(self, size: int, batch_size: int = 64) -> Iterator[np.ndarray]:
        table = self._table()
        check(self.column in table.column_names,
              f"reference table {self.path!r} has no {self.column!r} column (columns: {', '.join(table.column_names)})")
        for i in range(0, len(table), batch_size):
            yield np.stack([resize_centre_crop(img, size) for img in table[i:i + batch_size][self.column]])


@dataclass(frozen=True)
class FeatureStats:
    """Precomputed Inception statistics (mu (D,), sigma (D, D)); usable by FID only."""

    path: Path

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path, allow_pickle=False) as data:  # never unpickle
            check("mu" in data and "sigma" in data, f"{self.path} holds no `mu` and `sigma` arrays (clean-fid's format)")
            return data["mu"], data["sigma"]


def read_reference(spec: str, records: list[dict] | None = None):
    """A reference set from a spec: FOLDER (with `image_file` labels: only those files), TABLE, or STATS.npz."""
    path = Path(spec).expanduser()
    check(path.exists(), f"reference set {spec!r} not found; pass an image folder, a datasets table or a .npz of "
                         "feature statistics")
    if path.suffix == ".npz":
        return FeatureStats(path)
    if path.is_dir() and (path / "dataset_info.json").is_file() or path.suffix in (".parquet", ".arrow") or (
            path.is_dir() and any(path.glob("*.parquet"))):
        return DatasetImages(str(path))
    check(path.is_dir(), f"reference set {spec!r} is neither a folder, a table nor a .npz file")
    wanted = [r["image_file"] for r in records or [] if "image_file" in r]
    if wanted:
        files = [path / f for f in wanted]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"reference folder {spec!r} lacks {len(missing)} of the captioned images (first: "
                            f"{missing[0].name}); pass the matching val2017 folder")
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    check(len(files) > 1, f"reference folder {spec!r} holds {len(files)} images; FID needs at least 2")
    return ImageFiles(tuple(files))
