"""Image generation shared by evaluation and the recipes: one image per (prompt, seed), independent of batching.

EDM2's habit (docs in style.md): every image has its own seed. The initial latents of image i come from its own
`torch.Generator(seed_i)` and go to the family's stock diffusers pipeline (`StableDiffusionPipeline`, SDXL's, SD3's:
safeprune.backbones) as `latents=`; with DDIM at
eta = 0 (or the deterministic PNDM / DPM-Solver++ samplers) no further noise is added, so image i depends only on
(prompt_i, seed_i, guidance_i), not on the batch size or its position in a batch. Classifier-free guidance uses the
empty negative prompt, as SD does.

`generate_to_folder` is the at-scale path: PNGs are renamed into place as they are made and listed in
`prompts.jsonl` only afterwards, so a killed run resumes where it stopped and never reads a half-written file;
under `accelerate launch` each process draws every world_size-th record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from safeprune.errors import check

PROMPTS_FILE = "prompts.jsonl"

# ----------------------------------------------------------------------------- models and samplers


def load_model(path: str | Path | None, device: str | torch.device = "cpu"):
    """A pipeline folder, a pruned-UNet folder, a hub id in the HF cache or a shipped teacher's name (toy,
    toy-dit); None = the shipped toy teacher."""
    from safeprune.models.io import is_hub_id, load_pipeline
    from safeprune.models.shipped import TEACHERS, teacher_path

    folder = Path(path) if path is not None else teacher_path()
    check(folder.is_dir() or is_hub_id(str(path)) or str(path) in TEACHERS,
          f"model folder {str(folder)!r} not found; pass a diffusers pipeline or pruned-UNet folder")
    pipe = load_pipeline(folder if folder.is_dir() else str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def samplers() -> dict:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    return {"ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}),
            "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"})}


SCHEDULERS = ("ddim", "pndm", "dpm++")  # sample.scheduler values; all deterministic given the initial latents


def backbone_of_pipe(pipe):
    """The family (safeprune.backbones) of a loaded diffusers pipeline, by its class."""
    from safeprune.backbones import backbone_for_pipeline

    return backbone_for_pipeline(type(pipe).__name__, "the pipeline")


def use_sampler(pipe, name: str = "ddim") -> None:
    """Swap the pipeline's scheduler for `name` on the same noise schedule (a no-op if it already is one; flow-
    matching families keep their own deterministic Euler sampler)."""
    backbone_of_pipe(pipe).use_sampler(pipe, name)


def use_deterministic_sampler(pipe) -> None:
    """DDIM on the same noise schedule (eta = 0 in `generate_images`)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def latent_shape(pipe, resolution: int = 0) -> tuple[int, int, int]:
    """(C, h, w) of one image's latents; resolution 0 = the denoiser's own sample_size."""
    return backbone_of_pipe(pipe).latent_shape(pipe, resolution)


def initial_latents(pipe, seeds: list[int], resolution: int = 0) -> torch.Tensor:
    """(N, C, h, w) standard-normal latents, row i drawn from its own generator seeded with seeds[i]."""
    shape = latent_shape(pipe, resolution)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ----------------------------------------------------------------------------- sampling in memory


def _draw_batch(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, precision: str,
                resolution: int) -> np.ndarray:
    """uint8 (B, H, W, 3) for one batch at one guidance scale."""
    backbone = backbone_of_pipe(pipe)
    latents = initial_latents(pipe, seeds, resolution).to(pipe.device, backbone.denoiser_of(pipe).dtype)
    size = {"height": resolution, "width": resolution} if resolution else {}
    with torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        images = backbone.draw(pipe, prompts, latents, steps, guidance, size)  # (B, H, W, 3) in [0, 1]
    return (np.asarray(images, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 5.0,
                    batch_size: int = 64, progress: bool = True, precision: str = "fp32", scheduler: str = "ddim",
                    resolution: int = 0) -> np.ndarray:
    """uint8 images (N, H, W, 3); image i is a function of (prompts[i], seeds[i]) only.

    precision="bf16" runs the pipeline under bf16 autocast (3.4x faster UNet calls on CPUs with AMX, measured);
    images then differ slightly from fp32 ones, so compare models at one precision.
    """
    from tqdm import tqdm

    check(len(prompts) == len(seeds), f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds")
    check(len(prompts) > 0, "generate_images: no prompts to draw")
    check(precision in ("fp32", "bf16"), f"precision={precision!r}; choose fp32 or bf16")
    use_sampler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, dynamic_ncols=True):
        out.append(_draw_batch(pipe, list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size]), steps, guidance,
                               precision, resolution))
    return np.concatenate(out)


def write_images(folder: Path, images: np.ndarray) -> list[str]:
    """PNG files 00000.png, 00001.png, ... in `folder`; returns their names."""
    from PIL import Image

    names = [f"{k:05d}.png" for k in range(len(images))]
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)
    return names


# ----------------------------------------------------------------------------- sampling at scale, into a folder


def read_done(folder: Path) -> dict[int, dict]:
    """Records already drawn into `folder`: {index: record} from prompts*.jsonl whose PNG exists.

    A PNG is listed only after it was renamed into place, so every listed file is complete; a torn last line
    (a kill mid-write) is ignored and its image drawn again.
    """
    done = {}
    for path in sorted(folder.glob("prompts*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "index" in rec and (folder / str(rec.get("file"))).is_file():
                done[int(rec["index"])] = rec
    return done


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """The records process `rank` of `world` draws: every world-th one, so each process gets a mix of prompts."""
    check(world >= 1 and 0 <= rank < world, f"shard: rank {rank} of {world} processes")
    return indices[rank::world]


def _save_png(image: np.ndarray, path: Path) -> None:
    """Write to a hidden temporary name, then rename: the final name only ever holds a whole image."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _guided_batches(todo: list[int], records: list[dict], default: float, batch_size: int):
    """Batches of record indices that share one guidance scale (I2P prompts carry their own)."""
    groups: dict[float, list[int]] = {}
    for i in todo:
        g = records[i].get("guidance")
        groups.setdefault(float(default if g is None else g), []).append(i)
    for g, idx in groups.items():
        for j in range(0, len(idx), batch_size):
            yield g, idx[j:j + batch_size]


@torch.no_grad()
def generate_to_folder(pipe, records: list[dict], folder: str | Path, steps: int, guidance: float, batch_size: int,
                       precision: str = "fp32", scheduler: str = "ddim", resolution: int = 0, rank: int = 0,
                       world: int = 1, desc: str = "generate") -> int:
    """Draw every record ({prompt, seed, [guidance], labels...}) not yet in `folder`; returns the number drawn.

    Image k is `folder/k:05d.png`; its record (with `index` and `file`) is appended to prompts.jsonl (one file per
    process under accelerate: prompts.rank{r}.jsonl, merged by `merge_prompt_files`). On a CUDA out-of-memory error
    the batch is halved and retried, so `batch_size` can be set to what memory may allow.
    """
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = read_done(folder)
    todo = [i for i in shard(list(range(len(records))), rank, world) if i not in done]
    use_sampler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    log = folder / (PROMPTS_FILE if world == 1 else f"prompts.rank{rank}.jsonl")
    bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, disable=rank != 0 or not todo)
    drawn = 0
    torn = log.is_file() and log.stat().st_size > 0 and not log.read_bytes().endswith(b"\n")
    with open(log, "a") as f:
        if torn:  # a kill mid-line: end that line so the next record starts on its own
            f.write("\n")
        for g, idx in _guided_batches(todo, records, guidance, batch_size):
            for part, images in _draw_shrinking(pipe, records, idx, steps, g, precision, resolution):
                for i, image in zip(part, images):
                    name = f"{i:05d}.png"
                    _save_png(image, folder / name)
                    f.write(json.dumps({**records[i], "index": i, "file": name}) + "\n")
                    f.flush()
                drawn += len(part)
                bar.update(len(part))
    bar.close()
    return drawn


def _draw_shrinking(pipe, records, idx: list[int], steps, guidance, precision, resolution):
    """Yield (indices, images) for `idx`, halving the batch after a CUDA out-of-memory error."""
    size, start = len(idx), 0
    while start < len(idx):
        part = idx[start:start + size]
        try:
            images = _draw_batch(pipe, [records[i]["prompt"] for i in part], [records[i]["seed"] for i in part], steps,
                                 guidance, precision, resolution)
        except torch.cuda.OutOfMemoryError:
            check(size > 1, "out of GPU memory with one image per batch; lower --resolution or use a larger GPU")
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            continue
        yield part, images
        start += len(part)


def merge_prompt_files(folder: str | Path, n_records: int) -> list[dict]:
    """Write prompts.jsonl = every record in index order (after all processes finished) and drop the per-process
    files this module wrote; returns the records. Fails if any image is missing."""
    from safeprune.utils import atomic_file

    folder = Path(folder)
    done = read_done(folder)
    missing = [i for i in range(n_records) if i not in done]
    check(not missing, f"{folder}: {len(missing)} of {n_records} images are missing (first: index {missing[:1]}); "
                       "run the same command again to draw them")
    with atomic_file(folder / PROMPTS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(done[i]) + "\n" for i in range(n_records)))
    for part in folder.glob("prompts.rank*.jsonl"):
        part.unlink()
    return [done[i] for i in range(n_records)]


def read_image_folder(folder: str | Path) -> list[dict]:
    """Records of an image folder written by `generate_to_folder` or `safeprune generate` (prompts.jsonl with file)."""
    from safeprune.errors import UserError

    folder = Path(folder)
    path = folder / PROMPTS_FILE
    check(path.is_file(), f"{str(folder)!r} has no {PROMPTS_FILE}; pass a folder written by `safeprune evaluate` "
                          "or `safeprune generate`")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n} is not valid JSON ({err.msg}); the folder is damaged, regenerate it") from err
        check((folder / str(rec.get("file"))).is_file(), f"{path}:{n} lists {rec.get('file')!r}, which is missing")
        records.append(rec)
    return records


def load_images(folder: Path, records: list[dict]) -> np.ndarray:
    """uint8 (N, H, W, 3) images of `records` in `folder`."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in records])
