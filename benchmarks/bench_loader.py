"""Can the data loader keep a training step fed? Images/s of the streaming loader alone vs one training step.

Writes N generated images of `--size` px (toy-world drawings upscaled, with noise so JPEG decoding costs what
it costs on photos; JPEG quality 90) once as webdataset shards and as a parquet file written by `datasets`,
then times `safeprune.data.stream.ImageStream` -- decode, resize shorter side, random crop, flip, collate --
for each source and worker count (after one warm-up batch, which pays for worker start-up). The training
step is bench_finetune's distillation step of `--arch` (same batch) with random latents: the UNet work only;
stream mode adds one VAE encode and one text-encoder call per step on the training device, not measured here.

    needed img/s = batch / step time;  headroom = loader img/s / needed img/s  (> 1: the GPU is kept fed)

Usage: .venv/bin/python benchmarks/bench_loader.py [--size 512] [--resolution 512] [--images 256]
       [--shards 8] [--workers 0,2] [--batch 16] [--arch toy] [--device cpu] [--out bench_loader.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_finetune: the training step under test


def write_sources(folder: Path, n: int, size: int, shards: int) -> dict[str, str]:
    """n JPEGs of size x size as webdataset shards and as one parquet file -> {name: --data value}."""
    import datasets
    import webdataset as wds
    from PIL import Image
    from tqdm.auto import tqdm

    from safeprune.data.toyworld import ToyWorld

    world, rng = ToyWorld(), np.random.default_rng(0)
    blobs, captions = [], []
    for i in tqdm(range(n), desc=f"drawing {n} images of {size} px", leave=False):
        image, caption, _ = world.sample("finetune", i)
        big = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32)
        big = np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)  # photo-like entropy
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        captions.append(caption)
    per = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:04d}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                sink.write({"__key__": f"{i:07d}", "jpg": blobs[i], "txt": captions[i].encode()})
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "text": captions},
                                       features=features)
    table.to_parquet(str(folder / "train.parquet"))
    return {"webdataset": f"{folder}/{{0000..{shards - 1:04d}}}.tar", "parquet": str(folder / "train.parquet")}


def loader_rate(data: str, workers: int, batch: int, resolution: int, batches: int) -> float:
    """Images per second of the loader alone (after a warm-up batch)."""
    from safeprune.data.datasets import open_source
    from safeprune.data.stream import ImageStream

    stream = ImageStream(open_source(data), batch_size=batch, resolution=resolution, num_workers=workers,
                         shuffle_buffer=64, seed=0)
    stream.take(batch)  # worker start-up and the first decode
    start = time.perf_counter()
    for _ in range(batches):
        stream.take(batch)
    return batches * batch / (time.perf_counter() - start)


def step_time(arch: str, device: str, batch: int, iters: int) -> tuple[float, dict]:
    """Median seconds of one distillation step of `arch` at `batch` (bench_finetune's setup)."""
    from bench_finetune import build, run_block

    training, methods, info = build(arch, device, "no", batch)
    dev, distill = training.accelerator.device, methods["distill"]
    run_block(distill, training, 0, 2, dev)  # warm-up
    times = [run_block(distill, training, 2 + i, 1, dev)[0] for i in range(iters)]
    return statistics.median(times), info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="side of the generated images (px)")
    parser.add_argument("--resolution", type=int, default=0, help="training crop side (0 = --size)")
    parser.add_argument("--images", type=int, default=256, help="generated images")
    parser.add_argument("--shards", type=int, default=8, help="webdataset shards")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (loader and training step)")
    parser.add_argument("--batches", type=int, default=8, help="timed loader batches per configuration")
    parser.add_argument("--arch", default="toy", help="training step architecture: toy | sd-mini | sd15")
    parser.add_argument("--device", default="cpu", help="device of the training step")
    parser.add_argument("--iters", type=int, default=5, help="timed training steps")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    resolution = args.resolution or args.size

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_sources(Path(tmp), args.images, args.size, args.shards)
        for name, data in sources.items():
            for workers in (int(w) for w in args.workers.split(",")):
                rate = loader_rate(data, workers, args.batch, resolution, args.batches)
                rows.append({"source": name, "workers": workers, "images_per_s": round(rate, 1)})
    seconds, info = step_time(args.arch, args.device, args.batch, args.iters)
    needed = args.batch / seconds

    print(f"images {args.images} x {args.size} px JPEG -> crops of {resolution} px, batch {args.batch}")
    print(f"training step ({args.arch}, {args.device}, batch {args.batch}): {seconds:.3f} s -> needs {needed:.1f} img/s")
    print(f"{'source':<12}{'workers':>8}{'img/s':>10}{'headroom':>10}")
    for row in rows:
        row["headroom"] = round(row["images_per_s"] / needed, 2)
        print(f"{row['source']:<12}{row['workers']:>8}{row['images_per_s']:>10.1f}{row['headroom']:>9.2f}x")
    result = {"size": args.size, "resolution": resolution, "images": args.images, "batch": args.batch,
              "arch": args.arch, "device": args.device, "step_s": round(seconds, 4),
              "needed_images_per_s": round(needed, 1), "loader": rows, "model": info}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
