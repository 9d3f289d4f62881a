"""`safeprune pretrain teacher|judge`: train the embedded toy models that stand in for SD 2.1 and CSD/CLIP.

Teacher = a stock diffusers StableDiffusionPipeline, trained as SD was, in two stages on the toy `pretrain`
split (every concept, the forbidden ones included, so fine-tuning later has something to hide):
  1. AutoencoderKL: L = ||D(E(x)) - x||^2 + beta * KL(E(x) || N(0, I));
  2. text encoder + UNet jointly, L = E ||f_theta(z_t, t, tau(c)) - target||^2 with target = eps or v
     (seed eq. 1), captions dropped to "" with probability p so classifier-free guidance works.
With `teacher.arch = dit` the teacher is a StableDiffusion3Pipeline instead, trained as SD3 was on top of
frozen, already trained parts: the shipped teacher's VAE (stage 1) and its toy CLIP in both of SD3's CLIP roles
(CLIP-L and CLIP-G; SD3 trains on frozen CLIP/T5, Esser et al. 2024 Sec. 5.1), and an SD3Transformer2DModel
trained alone by rectified flow: x_t = (1 - s) x_0 + s eps, L = E ||v_theta(x_t, t, c) - (eps - x_0)||^2 with t
drawn logit-normally (SD3 eq. 3, 21; safeprune.backbones.base), the same caption dropout.
Randomness at step s comes from generators seeded with (seed, s), so a resumed run sees the same batches,
noise and timesteps as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from safeprune.checkpoint import STATE_FILE, latest, load_checkpoint, max_abs, save_step
from safeprune.config import Config, save_config
from safeprune.data.toyworld import COLOURS, SHAPES, STYLES, ToyWorld
from safeprune.errors import UserError, check
from safeprune.losses.denoising import denoising_target
from safeprune.models import toy
from safeprune.utils import atomic_folder, torch_rng, warmup_cosine
from safeprune.viz import make_grid, save_image

KL_WEIGHT = 1e-5  # small, as in SD's VAE: latents stay near-deterministic yet bounded
EMA_DECAY = 0.999  # the shipped weights are the EMA of the UNet and text encoder


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


FINAL_LR = 0.1  # both stages: linear warm-up, then cosine decay to 10 % of the peak learning rate
VAE_WARMUP = 100  # warm-up steps of stage 1
# Random streams of the two stages (`torch_rng(seed, STREAM, step)`).
VAE_STREAM, DENOISER_STREAM = 1, 2


def _resume_from(root: Path) -> Path | None:
    """The newest verified `root/step_N` checkpoint, or `root` itself in the older one-folder layout."""
    found = latest(root)
    if found:
        return found[0]
    return root if (root / STATE_FILE).is_file() else None


def _checkpoint(root: Path, step: int, modules: dict, optimizers: dict, extra: dict | None = None) -> None:
    """Refuse weights that are not finite (never checkpoint a diverged model), then keep the newest two."""
    peak = max_abs(modules)
    if not peak < float("inf"):  # inf or nan
        raise UserError(f"pretraining diverged at step {step} (weights not finite); the last good checkpoint is in "
                        f"{str(root)!r}: lower teacher.lr and resume with --resume")
    save_step(root, step, modules, optimizers, extra, keep=2)


def _update(opt, params, loss: torch.Tensor, lr: float) -> None:
    """One optimiser step of every stage: set the scheduled lr, backward, clip the gradient norm to 1, step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _save_atomic(obj, folder: Path) -> None:
    with atomic_folder(folder, overwrite=True) as tmp:
        obj.save_pretrained(tmp)


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(cfg: Config, world: ToyWorld, out: Path, resume: bool):
    tc = cfg.teacher
    done = out / "vae"
    if (done / "config.json").is_file():
        return AutoencoderKL.from_pretrained(done, use_safetensors=True)
    torch.manual_seed(cfg.seed)
    vae = toy.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=0.0)
    ckpt = out / "checkpoints" / "vae"
    found = _resume_from(ckpt) if resume else None
    start = load_checkpoint(found, {"vae": vae}, {"vae": opt})["step"] if found else 0
    bar = tqdm(range(start, tc.vae_steps), initial=start, total=tc.vae_steps, desc="vae", unit="step")
    for step in bar:
        images, _, _ = world.batch("pretrain", step * tc.vae_batch_size, tc.vae_batch_size)
        x = _to_tensor(images)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch_rng(cfg.seed, VAE_STREAM, step, bits=32))
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        loss = rec + KL_WEIGHT * posterior.kl().mean()
        _update(opt, vae.parameters(), loss, warmup_cosine(step, tc.vae_lr, VAE_WARMUP, tc.vae_steps, FINAL_LR))
        bar.set_postfix(rec=f"{rec.item():.4f}")
        if (step + 1) % tc.ckpt_every_steps == 0:
            _checkpoint(ckpt, step + 1, {"vae": vae}, {"vae": opt})
    # SD's convention: scale latents to unit variance so the UNet's noise schedule fits them.
    with torch.no_grad():
        images, _, _ = world.batch("pretrain", 10**7, 512)
        std = vae.encode(_to_tensor(images)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.eval()
    _save_atomic(vae, done)
    return vae


# ----------------------------------------------------------------------------- stage 2: UNet + text encoder


@torch.no_grad()
def _encode_pool(vae, world: ToyWorld, tokenizer, n: int) -> dict[str, torch.Tensor]:
    """Render and encode the stage-2 pool once: latent mean/std, captions, caption ids (N, L), empty-caption ids."""
    means, stds, captions = [], [], []
    for start in tqdm(range(0, n, 512), desc="encode pool", unit="batch"):
        images, caps, _ = world.batch("pretrain", start, min(512, n - start))
        dist = vae.encode(_to_tensor(images)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions += caps
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions, "ids": ids, "empty": empty}


def train_denoiser(cfg: Config, world: ToyWorld, vae, out: Path, resume: bool):
    tc = cfg.teacher
    # A resumed run must reuse the tokenizer its text encoder was trained with.
    tok_dir = out / "tokenizer"
    tokenizer = toy.load_tokenizer(tok_dir) if (tok_dir / "vocab.json").is_file() else \
        toy.build_tokenizer(world.vocabulary(), tok_dir)
    torch.manual_seed(cfg.seed + 1)
    text_encoder, unet = toy.build_text_encoder(tokenizer), toy.build_unet()
    train_sched, sample_sched = toy.build_schedulers(tc.prediction_type)
    ema_fn = get_ema_multi_avg_fn(EMA_DECAY)
    ema_unet = AveragedModel(unet, multi_avg_fn=ema_fn, use_buffers=True)
    ema_text = AveragedModel(text_encoder, multi_avg_fn=ema_fn, use_buffers=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.01)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    ckpt = out / "checkpoints" / "unet"
    found = _resume_from(ckpt) if resume else None
    start = load_checkpoint(found, modules, {"opt": opt})["step"] if found else 0

    pool = _encode_pool(vae, world, tokenizer, tc.pool_size)
    scale = vae.config.scaling_factor
    n, batch = len(pool["ids"]), tc.batch_size
    bar = tqdm(range(start, tc.unet_steps), initial=start, total=tc.unet_steps, desc="unet", unit="step")
    for step in bar:
        g = torch_rng(cfg.seed, DENOISER_STREAM, step, bits=32)
        idx = torch.randint(0, n, (batch,), generator=g)
        latents = (pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=g)) * scale
        ids = pool["ids"][idx]
        drop = torch.rand(batch, generator=g) < tc.caption_dropout
        ids[drop] = pool["empty"]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = train_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, denoising_target(train_sched, latents, noise, t))
        _update(opt, params, loss, warmup_cosine(step, tc.lr, tc.warmup_steps, tc.unet_steps, FINAL_LR))
        ema_unet.update_parameters(unet)
        ema_text.update_parameters(text_encoder)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % tc.ckpt_every_steps == 0 or step + 1 == tc.unet_steps:
            _checkpoint(ckpt, step + 1, modules, {"opt": opt}, {"loss": loss.item()})
        if (step + 1) % tc.sample_every_steps == 0:
            pipe = toy.assemble_pipeline(vae, ema_text.module, tokenizer, ema_unet.module, sample_sched)
            save_image(sample_grid(pipe, cfg), out / "samples" / f"step{step + 1:06d}.png")
    return toy.assemble_pipeline(vae, ema_text.module.eval(), tokenizer, ema_unet.module.eval(), sample_sched)


@torch.no_grad()
def sample_grid(pipe, cfg: Config, seed: int = 0):
    """Rows = styles, columns = (shape, colour) pairs; image j of a row uses seed `seed + j`."""
    pipe.set_progress_bar_config(disable=True)
    combos = [(s, c) for s in SHAPES for c in COLOURS][::2]
    rows = []
    for style in STYLES:
        prompts = [f"a {c} {s} in {style} style" for s, c in combos]
        gens = [torch.Generator().manual_seed(seed + j) for j in range(len(prompts))]
        out = pipe(prompts, num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance,
                   generator=gens, output_type="np").images
        rows.append(list((out * 255).round().astype(np.uint8)))
    return make_grid(rows, list(STYLES), [f"{c} {s}" for s, c in combos])


# ----------------------------------------------------------------------------- stage 2, arch dit: the MMDiT


def _shipped_parts():
    """(VAE, CLIP with projection, tokenizer) of the shipped UNet teacher, frozen: the `dit` teacher's stage 1 and
    text encoder. CLIPTextModelWithProjection (SD3's class) adds a projection of the pooled output, initialised
    from the seeded RNG and frozen too: an invertible map of the pooled state, which the transformer's pooled-text
    embedder learns to read."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from safeprune.models.shipped import teacher_path

    root = teacher_path()
    vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline decodes (z / scale) + shift; the toy VAE needs none
    text = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", use_safetensors=True)
    return vae.requires_grad_(False).eval(), text.requires_grad_(False).eval(), CLIPTokenizer.from_pretrained(root / "tokenizer")


def train_transformer(cfg: Config, world: ToyWorld, out: Path, resume: bool):
    from safeprune.backbones import get_backbone
    from safeprune.backbones.base import training_schedule

    tc, backbone = cfg.teacher, get_backbone("sd3")
    torch.manual_seed(cfg.seed + 1)
    vae, text, tokenizer = _shipped_parts()
    transformer = toy.build_transformer()
    pipe = toy.assemble_dit_pipeline(vae, text, text, tokenizer, transformer)
    schedule = training_schedule(backbone.training_scheduler(pipe), backbone.timestep_density)
    ema = AveragedModel(transformer, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=tc.lr, weight_decay=0.01)
    modules = {"transformer": transformer, "ema_transformer": ema}
    ckpt = out / "checkpoints" / "transformer"
    found = _resume_from(ckpt) if resume else None
    start = load_checkpoint(found, modules, {"opt": opt})["step"] if found else 0

    # The text encoders are frozen: every distinct caption (and "") is encoded once.
    pool = _encode_pool(vae, world, tokenizer, tc.pool_size)
    captions = sorted(set(pool["captions"]) | {""})
    index = {c: i for i, c in enumerate(captions)}
    emb = backbone.encode(pipe, captions, "cpu")
    cap = torch.tensor([index[c] for c in pool["captions"]])
    scale, n, batch = vae.config.scaling_factor, len(cap), tc.batch_size
    bar = tqdm(range(start, tc.unet_steps), initial=start, total=tc.unet_steps, desc="transformer", unit="step")
    for step in bar:
        g = torch_rng(cfg.seed, DENOISER_STREAM, step, bits=32)
        idx = torch.randint(0, n, (batch,), generator=g)
        latents = (pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=g)) * scale
        c = cap[idx].clone()
        c[torch.rand(batch, generator=g) < tc.caption_dropout] = index[""]
        noise, t, x_t = schedule.noised(latents, g, "cpu")
        loss = F.mse_loss(backbone.predict(transformer, x_t, t, emb[c]), schedule.target(latents, noise, t))
        _update(opt, transformer.parameters(), loss, warmup_cosine(step, tc.lr, tc.warmup_steps, tc.unet_steps, FINAL_LR))
        ema.update_parameters(transformer)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % tc.ckpt_every_steps == 0 or step + 1 == tc.unet_steps:
            _checkpoint(ckpt, step + 1, modules, {"opt": opt}, {"loss": loss.item()})
        if (step + 1) % tc.sample_every_steps == 0:
            sample = toy.assemble_dit_pipeline(vae, text, text, tokenizer, ema.module)
            save_image(sample_grid(sample, cfg), out / "samples" / f"step{step + 1:06d}.png")
    return toy.assemble_dit_pipeline(vae, text, text, tokenizer, ema.module.eval())


def train_teacher(cfg: Config, out: Path, resume: bool = False) -> Path:
    """Both stages, then the pipeline folder `out/pipeline` (stock diffusers layout) and `out/timing.json`."""
    world = ToyWorld(cfg.toyworld, seed=cfg.seed)
    save_config(cfg, out)
    start, cpu = time.perf_counter(), time.process_time()
    if cfg.teacher.arch == "dit":
        vae_s = 0.0  # stage 1 is the shipped teacher's VAE
        pipe = train_transformer(cfg, world, out, resume)
    else:
        vae = train_vae(cfg, world, out, resume)
        vae.requires_grad_(False)
        vae_s = time.perf_counter() - start
        pipe = train_denoiser(cfg, world, vae, out, resume)
    _save_atomic(pipe, out / "pipeline")
    save_image(sample_grid(pipe, cfg), out / "samples" / "final.png")
    timing = {"vae_s": vae_s, "total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
              "resumed": resume, "threads": torch.get_num_threads(), "arch": cfg.teacher.arch}
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    print(f"teacher pipeline: {out / 'pipeline'} ({timing['total_s'] / 60:.1f} min this run)")
    report_quality(pipe, world, cfg, out)
    return out / "pipeline"


def report_quality(pipe, world: ToyWorld, cfg: Config, out: Path) -> dict | None:
    """The judge's per-style shape/colour/style accuracy on generated images -> quality.json."""
    from safeprune.eval.judge import load_judge
    from safeprune.eval.metrics import teacher_quality

    try:
        judge = load_judge()
    except UserError as err:  # no judge yet (it is trained after the teacher on a fresh checkout): say so
        print(f"teacher quality not measured: {err}")
        return None
    quality = teacher_quality(pipe, world, judge, cfg.teacher.eval_images, cfg)
    (out / "quality.json").write_text(json.dumps(quality, indent=1))
    print(f"{'style':<10} shape  colour style  valid   ({quality['n_images']} images, judge-scored)")
    for style, acc in quality["per_style"].items():
        mark = " (forbidden in fine-tuning)" if style in world.forbidden["style"] else ""
        print(f"{style:<10} {acc['shape']:.3f}  {acc['colour']:.3f}  {acc['style']:.3f}  {acc['valid']:.3f}{mark}")
    return quality


def run(cfg: Config, args) -> int:
    out = Path(cfg.paths.out)
    if args.what == "judge":
        from safeprune.recipes.judge import run_pretrain_judge

        return run_pretrain_judge(cfg, args)
    from safeprune.runs import lock, open_run

    with lock(out, "pretrain teacher"):
        run = open_run(out, "pretrain teacher", resume=args.resume, overwrite=args.overwrite,
                       legacy=lambda folder: (folder / "checkpoints").is_dir())
        check(not (args.resume and run.state == "finished"),
              f"the teacher in {str(out)!r} is already trained; pass --overwrite to train it again or a new --out")
        run.begin(claim=TEACHER_FILES).save(state="training")
        train_teacher(cfg, out, resume=args.resume)
        run.save(state="finished")
    return 0


# what `pretrain teacher` writes at the top level of its folder (claimed in the run marker before it is written)
TEACHER_FILES = ("config.yaml", "checkpoints", "vae", "tokenizer", "samples", "pipeline", "timing.json",
                 "quality.json")
