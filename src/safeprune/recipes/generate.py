"""`safeprune generate` and `safeprune concept-images`: one image per (prompt, seed), independent of batching.

EDM2's habit (style.md): every image has its own seed. The initial latents of image i come from its own
`torch.Generator(seed_i)` and go to the stock diffusers `StableDiffusionPipeline` as `latents=`; with DDIM at
eta = 0 the sampler adds no further noise, so image i depends only on (prompt_i, seed_i), not on the batch size
or its position in a batch. Classifier-free guidance uses the empty negative prompt, as SD does.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from safeprune.config import Config, save_config
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError, check
from safeprune.utils import atomic_folder, read_text, resolve_device

# ----------------------------------------------------------------------------- models and prompts


def load_model(path: str | Path | None, device: str | torch.device = "cpu"):
    """A pipeline folder or a pruned-UNet folder; None = the shipped toy teacher. Progress bars off."""
    from safeprune.models.shipped import teacher_path

    folder = Path(path) if path is not None else teacher_path()
    check(folder.is_dir(), f"model folder {str(folder)!r} not found; pass a diffusers pipeline or pruned-UNet folder")
    if importlib.util.find_spec("safeprune.models.io") is not None:
        from safeprune.models.io import load_pipeline

        pipe = load_pipeline(folder)
    else:  # until models/io.py lands: plain diffusers pipeline folders only
        pipe = _load_stock_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_stock_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    check((folder / "model_index.json").is_file(),
          f"{str(folder)!r} has no model_index.json; pass a diffusers StableDiffusionPipeline folder")
    try:
        return StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load the pipeline in {str(folder)!r}: {str(err).splitlines()[0]}") from err


def read_prompts(spec: str, world: ToyWorld) -> list[str]:
    """`toy:SET` (a toy-world prompt set, e.g. toy:forget) or a text file with one prompt per line ('#' = comment)."""
    if spec.startswith("toy:"):
        return [r["prompt"] for r in world.prompts(spec.removeprefix("toy:"))]
    path = Path(spec)
    check(path.is_file(), f"prompt file {spec!r} not found; pass a text file (one prompt per line) or toy:SET, "
                          "e.g. toy:forget")
    prompts = [line.strip() for line in read_text(path, "prompt file").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    check(bool(prompts), f"prompt file {spec!r} holds no prompts; write one prompt per line")
    return prompts


# ----------------------------------------------------------------------------- sampling


def initial_latents(pipe, seeds: list[int]) -> torch.Tensor:
    """(N, C, h, w) standard-normal latents, row i drawn from its own generator seeded with seeds[i]."""
    cfg = pipe.unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.stack([torch.randn((cfg.in_channels, h, w), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def use_deterministic_sampler(pipe) -> None:
    """Swap a stochastic or multistep sampler for DDIM on the same noise schedule (eta = 0 in `generate_images`)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 5.0,
                    batch_size: int = 64, progress: bool = True, precision: str = "fp32") -> np.ndarray:
    """uint8 images (N, H, W, 3); image i is a function of (prompts[i], seeds[i]) only.

    precision="bf16" runs the pipeline under bf16 autocast (3.4x faster UNet calls on CPUs with AMX, measured);
    images then differ slightly from fp32 ones, so compare models at one precision.
    """
    from tqdm import tqdm

    check(len(prompts) == len(seeds), f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds")
    check(len(prompts) > 0, "generate_images: no prompts to draw")
    check(precision in ("fp32", "bf16"), f"precision={precision!r}; choose fp32 or bf16")
    use_deterministic_sampler(pipe)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, dynamic_ncols=True):
        batch = list(prompts[i:i + batch_size])
        latents = initial_latents(pipe, seeds[i:i + batch_size]).to(pipe.device, pipe.unet.dtype)
        with torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            images = pipe(prompt=batch, negative_prompt=[""] * len(batch), latents=latents, num_inference_steps=steps,
                          guidance_scale=guidance, eta=0.0, output_type="np").images  # (B, H, W, 3) in [0, 1]
        out.append((np.asarray(images, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def _write_images(folder: Path, images: np.ndarray) -> list[str]:
    """PNG files 00000.png, 00001.png, ... in `folder`; returns their names."""
    from PIL import Image

    names = [f"{k:05d}.png" for k in range(len(images))]
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)
    return names


# ----------------------------------------------------------------------------- CLI targets


def _draw(cfg: Config, model: str | None, pairs: list[tuple[str, int]]) -> np.ndarray:
    """Images for (prompt, seed) pairs with the model at `model` (None = the toy teacher) and cfg.sample."""
    pipe = load_model(model, resolve_device(cfg.device))
    sc = cfg.sample
    return generate_images(pipe, [p for p, _ in pairs], [s for _, s in pairs], sc.steps, sc.guidance, sc.batch_size,
                           precision=sc.precision)


def run(cfg: Config, args) -> int:
    """`safeprune generate --model PATH --prompts FILE|toy:SET --seeds N --out DIR`."""
    from safeprune.viz import make_grid, save_image

    check(args.seeds > 0, f"--seeds {args.seeds}: draw at least one image per prompt")
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    prompts = read_prompts(args.prompts, world)
    seeds = list(range(cfg.seed, cfg.seed + args.seeds))
    pairs = [(p, s) for p in prompts for s in seeds]  # prompt-major: row r of the grid is prompt r
    start = time.perf_counter()
    with atomic_folder(cfg.paths.out) as tmp:  # fails early on a non-empty --out, leaves nothing on an error
        images = _draw(cfg, cfg.paths.model or None, pairs)
        records = [{"prompt": p, "seed": s} for p, s in pairs]
        names = _write_images(tmp, images)
        with open(tmp / "prompts.jsonl", "w") as f:
            f.writelines(json.dumps({**record, "file": name}) + "\n" for record, name in zip(records, names))
        # Grid: one row per prompt, one column per seed (at most 48 x 16 tiles, so it stays viewable).
        rows = [list(images[r * len(seeds):(r + 1) * len(seeds)][:16]) for r in range(min(len(prompts), 48))]
        grid = make_grid(rows, [p[:48] for p in prompts[:48]], [f"seed {s}" for s in seeds[:16]])
        save_image(grid, tmp / "grid.png")
        save_config(cfg, tmp)
    seconds = time.perf_counter() - start
    print(f"wrote {len(images)} images, prompts.jsonl and grid.png to {cfg.paths.out} in {seconds:.1f}s")
    return 0


def run_concept_images(cfg: Config, args) -> int:
    """`safeprune concept-images --prompts P... --n N --out DIR`: the upper level's concept images, drawn by the
    teacher, as a diffusers image folder (metadata.jsonl with file_name, text)."""
    check(args.n > 0, f"--n {args.n}: draw at least one image per prompt")
    prompts = [p.strip() for p in args.prompts]
    check(all(prompts), "--prompts: every prompt must be non-empty text")
    seeds = list(range(cfg.seed, cfg.seed + args.n))
    pairs = [(p, s) for p in prompts for s in seeds]
    start = time.perf_counter()
    with atomic_folder(cfg.paths.out) as tmp:
        images = _draw(cfg, cfg.paths.model or None, pairs)
        records = [{"text": p, "seed": s} for p, s in pairs]
        names = _write_images(tmp, images)
        with open(tmp / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps({"file_name": name, **record}) + "\n" for record, name in zip(records, names))
        save_config(cfg, tmp)
    print(f"wrote {len(images)} concept images + metadata.jsonl to {cfg.paths.out} in {time.perf_counter() - start:.1f}s")
    return 0
