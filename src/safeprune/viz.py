"""Image grids with row/column labels (Fig.-1-style panels), drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_grid(rows: list[list[np.ndarray]], row_labels: list[str] = (), col_labels: list[str] = (),
              scale: int = 3, pad: int = 2) -> Image.Image:
    """Tile uint8 images (H, W, 3) into a labelled grid; every image is upscaled `scale`x (nearest)."""
    h, w = rows[0][0].shape[:2]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    font = ImageFont.load_default()
    left = 8 + 7 * max((len(t) for t in row_labels), default=0)
    top = 14 if col_labels else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncols * cell_w, top + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((left + j * cell_w + 2, 1), label[: cell_w // 6], fill="black", font=font)
    for i, row in enumerate(rows):
        if i < len(row_labels):
            draw.text((4, top + i * cell_h + cell_h // 2 - 6), row_labels[i], fill="black", font=font)
        for j, img in enumerate(row):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (left + j * cell_w, top + i * cell_h))
    return canvas


def save_image(image: Image.Image, path: str | Path) -> Path:
    from safeprune.utils import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
