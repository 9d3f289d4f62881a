"""Training-image transforms of the paper's fine-tuning (as diffusers' train_text_to_image.py does them).

    resize the shorter side to `resolution` (bilinear)  ->  random or centre crop to resolution^2
    ->  horizontal flip with probability 1/2  ->  float tensor (3, R, R) in [-1, 1]

Hand-written in PIL + numpy rather than torchvision.transforms: the torchvision wheel on PyPI is a CUDA
build that breaks `import diffusers` beside our CPU torch (the reason it is not a dependency in
pyproject.toml), and these three steps are
a dozen lines. The arithmetic follows torchvision's PIL path (Resize(int): long side = int(long * R / short);
CenterCrop: int(round((H - R) / 2))), so crops match the reference script pixel for pixel.

Randomness is explicit: every sample gets its own `numpy.random.Generator` from
`safeprune.utils.numpy_rng(seed, *key)`,
so a sample's crop and flip depend only on (seed, epoch, its identity) -- not on worker count, batch
size or what was drawn before it -- which keeps streamed training reproducible and resumable.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image) -> torch.Tensor:
    """RGB PIL image (W, H) -> float tensor (3, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def train_image(image, resolution: int, *, random_crop: bool, random_flip: bool,
                rng: np.random.Generator) -> torch.Tensor:
    """PIL image -> (3, resolution, resolution) in [-1, 1]: short-side resize, crop, optional flip."""
    image = image.convert("RGB")
    w, h = image.size
    size = (resolution, int(h * resolution / w)) if w <= h else (int(w * resolution / h), resolution)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    # Both draws happen whatever the flags say, so switching one augmentation off leaves the other's
    # samples unchanged (a run with random_flip=False crops exactly as the same run with flips).
    left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    flip = bool(rng.random() < 0.5)
    if not random_crop:
        left, top = round((w - resolution) / 2.0), round((h - resolution) / 2.0)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image)
