"""Evaluation metrics: a registry of toy-world metrics read by the judge, and the real-scale maths.

Toy world (issue 6 item 2), each on the training templates and, as `heldout_*`, on held-out paraphrases:
  valid      share of images that show a recognisable object at all;
  leakage    share of forget-prompt images judged to show the forbidden concept (lower is better). An image
             without an object is not counted as leaked, but it is not a success either: `forget_valid` and
             `suppressed` (object present, concept absent) stand next to it;
  retention  share of retain-prompt images that show the requested style (no object = failure);
  adherence  shape and colour accuracy (no object = failure; a forbidden attribute is not scored);
  fd         Frechet distance (our FID) between judge features of retain-prompt images and real renderer images
             with the same labels;
  cp         CP score (safeprune.eval.cp): share of forget images judged less like the concept, by a margin, than
             the reference model's image for the same prompt and seed (the paper's reference: the distilled student);
  concept_affinity  sampling-free: on real concept images, the relative drop of the model's denoising error
             under the concept prompt versus the same prompt with the concept swapped out (seed eq. 1).
Real scale: Frechet distance (Heusel et al. 2017), MMD with the Gaussian kernel of CMMD (Jayasumana et al.
2024) and CLIP score (Hessel et al. 2021), with Inception / CLIP weights read from local paths only.
"""

from __future__ import annotations

import re
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from safeprune.config import Config, SampleConfig
from safeprune.data.toyworld import Labels, ToyWorld, draw
from safeprune.errors import UserError, check, choose
from safeprune.eval.cp import cp_score

# ----------------------------------------------------------------------------- maths on features


def frechet_distance(x, y) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) for features x (N, D), y (M, D).

    Tr((S_x S_y)^(1/2)) is computed as the sum of square roots of the eigenvalues of S_x^(1/2) S_y S_x^(1/2), a
    symmetric PSD matrix with the same spectrum, so `eigh` suffices (no scipy `sqrtm`, no complex round-off).
    """
    x, y = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    check(x.ndim == 2 and y.ndim == 2 and x.shape[1] == y.shape[1] and len(x) > 1 and len(y) > 1,
          f"frechet_distance needs two (N>1, D) feature sets of one width, got {tuple(x.shape)} and {tuple(y.shape)}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    w, v = torch.linalg.eigh(cov_x)
    root_x = (v * w.clamp(min=0).sqrt()) @ v.T  # S_x^(1/2)
    cross = torch.linalg.eigvalsh(root_x @ cov_y @ root_x).clamp(min=0).sqrt().sum()
    value = (mu_x - mu_y).square().sum() + cov_x.trace() + cov_y.trace() - 2 * cross
    return float(value.clamp(min=0))


def mmd(x, y, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """Squared MMD with a Gaussian kernel, CMMD's estimator (all pairs, diagonal included) and its constants."""
    x, y = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    gamma = 1.0 / (2 * sigma**2)

    def k(a, b):
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


def clip_score(image_embeddings, text_embeddings) -> float:
    """100 * mean(max(cos(image_i, text_i), 0)) over matched rows (Hessel et al. 2021, torchmetrics' scaling)."""
    a, b = torch.as_tensor(np.asarray(image_embeddings)).double(), torch.as_tensor(np.asarray(text_embeddings)).double()
    check(a.shape == b.shape, f"clip_score needs one text per image, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(100 * torch.nn.functional.cosine_similarity(a, b, dim=1).clamp(min=0).mean())


# ----------------------------------------------------------------------------- real-scale feature extractors


def inception_features(images: np.ndarray, weights: str | Path, batch_size: int = 64) -> np.ndarray:
    """2048-d pool features of the FID Inception network (clean-fid's / StyleGAN's TorchScript
    `inception-2015-12-05.pt`, loaded from a local file: nothing is downloaded)."""
    from safeprune.utils import require_file

    path = require_file(weights or "<unset>", "Inception weights",
                        "set eval.inception_path to a local copy of the FID network `inception-2015-12-05.pt` "
                        "(TorchScript, as used by clean-fid)")
    try:
        with warnings.catch_warnings():  # the FID network ships as TorchScript; torch 2.13 flags jit.load
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise UserError(f"Inception weights {str(path)!r} are not a TorchScript file ({str(err).splitlines()[0]}); "
                        "pass `inception-2015-12-05.pt`") from err
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float()  # uint8 range, the network resizes to 299
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch_size], return_features=True) for i in range(0, len(x), batch_size)]).numpy()


def clip_embeddings(folder: str | Path, images: np.ndarray | None = None, texts: list[str] | None = None):
    """(image embeddings, text embeddings) of a local transformers CLIP folder (config.json + weights)."""
    from safeprune.utils import require_file

    require_file(Path(folder or "<unset>") / "config.json", "CLIP model config",
                 "set eval.clip_path to a local transformers CLIP folder (e.g. a saved openai/clip-vit-base-patch32)")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()
    except OSError as err:  # e.g. only pytorch_model.bin: a pickle, never loaded
        raise UserError(f"eval.clip_path {str(folder)!r} holds no safetensors CLIP weights "
                        f"({str(err).splitlines()[0][:120]}); save the model with safetensors") from err
    proc = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    def projected(out) -> np.ndarray:  # transformers 5 wraps the projected embedding in `pooler_output`
        return (out if torch.is_tensor(out) else out.pooler_output).numpy()

    img = txt = None
    with torch.no_grad():
        if images is not None:
            pixels = proc(images=list(images), return_tensors="pt")["pixel_values"]
            img = projected(model.get_image_features(pixel_values=pixels))
        if texts is not None:
            tok = proc(text=list(texts), return_tensors="pt", padding=True, truncation=True)
            txt = projected(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    return img, txt


# ----------------------------------------------------------------------------- generated sets, judged once


@dataclass(frozen=True)
class Generated:
    """One prompt set drawn by one model: per-image prompt records (with `seed`), images and the judge's view."""

    records: list[dict]
    images: np.ndarray  # (N, H, W, 3) uint8
    judged: dict  # Judge.predict output
    features: np.ndarray  # (N, D) judge features


def _interleave_by_style(records: list[dict]) -> list[dict]:
    """Reorder so that any prefix covers styles, shapes and colours about equally.

    Within a style the records run shape-major over (shape, colour); stepping through them with stride 5 (coprime
    to every possible count: 1-4 shapes x 1-4 colours) visits a new shape and a new colour at each step, and
    each style starts elsewhere. Then round-robin over styles.
    """
    groups: dict = {}
    for r in records:
        groups.setdefault(r["style"], []).append(r)
    lists = [[lst[(5 * i + 7 * g) % len(lst)] for i in range(len(lst))] for g, lst in enumerate(groups.values())]
    return [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]


class EvalContext:
    """What the metrics share: the model, the judge, and each prompt set generated at most once per model.

    `reference_cache` (a dict) may be shared between calls that use the same reference model, so the
    reference's images for the CP score are drawn once per demo rather than once per evaluated model.
    """

    def __init__(self, pipe, world: ToyWorld, cfg: Config, judge, reference_pipe=None,
                 reference_cache: dict | None = None, progress: bool = False):
        self.pipe, self.world, self.cfg, self.judge = pipe, world, cfg, judge
        self.reference_pipe = reference_pipe
        self._cache: dict = {}
        self.reference_cache = reference_cache if reference_cache is not None else {}
        self.progress = progress
        self.n_generated = 0

    def set_names(self, kind: str) -> list[str]:
        """['forget', 'heldout_forget'] for kind 'forget' (the held-out one only if eval.heldout)."""
        return [kind] + ([f"heldout_{kind}"] if self.cfg.eval.heldout else [])

    def records(self, set_name: str) -> list[dict]:
        """Prompt records of a set, capped at eval.max_prompts (spread over styles), x eval.seeds_per_prompt."""
        ec = self.cfg.eval
        prompts = _interleave_by_style(self.world.prompts(set_name))[:ec.max_prompts]
        base = zlib.crc32(f"{self.cfg.seed}:{set_name}".encode()) % 2**30  # same seeds for every model
        return [{**p, "seed": base + j * len(prompts) + i}
                for j in range(ec.seeds_per_prompt) for i, p in enumerate(prompts)]

    def _key(self, set_name: str, reference: bool):
        """Cache key. A model that is its own reference (the teacher) files its images as the reference's, so
        later calls sharing `reference_cache` reuse them. The shared cache outlives this context: its keys hold
        everything that decides the images."""
        if not (reference or self.reference_pipe is self.pipe):
            return self._cache, set_name
        sc, ec = self.cfg.sample, self.cfg.eval
        return self.reference_cache, (set_name, self.cfg.seed, ec.max_prompts, ec.seeds_per_prompt, sc.steps,
                                       sc.guidance, sc.precision)

    def drawn(self, set_name: str) -> Generated | None:
        """The model's images of a set if they have been generated already (no sampling)."""
        cache, key = self._key(set_name, reference=False)
        return cache.get(key)

    def generated(self, set_name: str, reference: bool = False) -> Generated:
        from safeprune.recipes.generate import generate_images

        cache, key = self._key(set_name, reference)
        if key not in cache:
            pipe = self.reference_pipe if reference else self.pipe
            sc: SampleConfig = self.cfg.sample
            records = self.records(set_name)
            images = generate_images(pipe, [r["prompt"] for r in records], [r["seed"] for r in records], sc.steps,
                                     sc.guidance, sc.batch_size, progress=self.progress, precision=sc.precision)
            self.n_generated += len(images)
            cache[key] = Generated(records, images, self.judge.predict(images), self.judge.features(images))
        return cache[key]

    def real_features(self, set_name: str) -> np.ndarray:
        """Judge features of eval.real_per_image renderer images per generated image, with the same labels."""
        key = f"real:{set_name}"
        if key not in self._cache:
            size, images = self.world.cfg.size, []
            for k, r in enumerate(self.records(set_name)):
                labels = Labels(r["shape"], r["colour"], r["style"])
                for j in range(self.cfg.eval.real_per_image):
                    images.append(draw(labels, np.random.default_rng([self.cfg.seed, 7, k, j]), size))
            self._cache[key] = self.judge.features(np.stack(images))
        return self._cache[key]

    def is_concept(self, record: dict, judged: dict, i: int) -> bool:
        """Does image i show (one of) the forbidden concept(s) its prompt names?"""
        return any(record[kind] in names and judged[kind][i] == record[kind]
                   for kind, names in self.world.forbidden.items())


# ----------------------------------------------------------------------------- the registry


def _prefix(set_name: str) -> str:
    return "heldout_" if set_name.startswith("heldout_") else ""


@dataclass(frozen=True)
class Valid:
    """Share of images (forget + retain prompts) that show a recognisable object."""

    def __call__(self, ctx: EvalContext) -> dict:
        out = {}
        for forget, retain in zip(ctx.set_names("forget"), ctx.set_names("retain")):
            flags = np.concatenate([ctx.generated(forget).judged["valid"], ctx.generated(retain).judged["valid"]])
            out[f"{_prefix(forget)}valid"] = float(flags.mean())
        return out


@dataclass(frozen=True)
class Leakage:
    """Forget prompts: share judged as the forbidden concept, next to forget_valid and suppressed."""

    def __call__(self, ctx: EvalContext) -> dict:
        out = {}
        for name in ctx.set_names("forget"):
            gen, pre = ctx.generated(name), _prefix(name)
            leaked = np.array([ctx.is_concept(r, gen.judged, i) for i, r in enumerate(gen.records)])
            valid = gen.judged["valid"]
            out[f"{pre}leakage"] = float(leaked.mean())
            out[f"{pre}forget_valid"] = float(valid.mean())
            out[f"{pre}suppressed"] = float((valid & ~leaked).mean())  # an object, without the concept
        return out


@dataclass(frozen=True)
class Retention:
    """Retain prompts: share of images that show the requested style (no object = failure)."""

    def __call__(self, ctx: EvalContext) -> dict:
        out = {}
        for name in ctx.set_names("retain"):
            gen = ctx.generated(name)
            hits = [gen.judged["style"][i] == r["style"] for i, r in enumerate(gen.records)]
            out[f"{_prefix(name)}retention"] = float(np.mean(hits))
        return out


@dataclass(frozen=True)
class Adherence:
    """Shape and colour accuracy over forget and retain prompts; a forbidden attribute is not scored."""

    def __call__(self, ctx: EvalContext) -> dict:
        out = {}
        for forget, retain in zip(ctx.set_names("forget"), ctx.set_names("retain")):
            hits: dict = {"shape": [], "colour": []}
            for name in (forget, retain):
                gen = ctx.generated(name)
                for i, r in enumerate(gen.records):
                    for kind, h in hits.items():
                        if r[kind] not in ctx.world.forbidden[kind]:
                            h.append(gen.judged[kind][i] == r[kind])
            pre = _prefix(forget)
            for kind, h in hits.items():
                out[f"{pre}adherence_{kind}"] = float(np.mean(h)) if h else float("nan")
            out[f"{pre}adherence"] = float(np.nanmean([out[f"{pre}adherence_{k}"] for k in hits]))
        return out


@dataclass(frozen=True)
class FD:
    """Frechet distance in judge-feature space, retain-prompt images vs real images of the same labels."""

    def __call__(self, ctx: EvalContext) -> dict:
        return {f"{_prefix(n)}fd": frechet_distance(ctx.generated(n).features, ctx.real_features(n))
                for n in ctx.set_names("retain")}


@dataclass(frozen=True)
class CP:
    """Share of forget images (same prompt and seed) judged less like the concept than the reference's image
    (safeprune.eval.cp.cp_score: by more than its margin)."""

    def __call__(self, ctx: EvalContext) -> dict:
        if ctx.reference_pipe is None:
            return {}
        out = {}
        for name in ctx.set_names("forget"):
            mine, ref = ctx.generated(name), ctx.generated(name, reference=True)
            p_mine, p_ref = [], []
            for i, r in enumerate(mine.records):
                kinds = [k for k, names in ctx.world.forbidden.items() if r[k] in names]
                p_mine.append(max(_concept_prob(mine.judged, k, r[k], i) for k in kinds))
                p_ref.append(max(_concept_prob(ref.judged, k, r[k], i) for k in kinds))
            out[f"{_prefix(name)}cp"] = cp_score(p_mine, p_ref, mine.judged["valid"])
        return out


def _concept_prob(judged: dict, kind: str, value: str, i: int) -> float:
    from safeprune.data.toyworld import COLOURS, SHAPES, STYLES

    names = {"shape": SHAPES, "colour": tuple(COLOURS), "style": STYLES}[kind]
    return float(judged["probs"][kind][i, names.index(value)])


@dataclass(frozen=True)
class ConceptAffinity:
    """Sampling-free concept knowledge (see `concept_affinity`), with the reference model's value beside it."""

    def __call__(self, ctx: EvalContext) -> dict:
        n, seed = ctx.cfg.eval.affinity_images, ctx.cfg.seed
        key = ("concept_affinity", n, seed)  # the reference's value, shared like its images
        if ctx.reference_pipe is ctx.pipe:
            if key not in ctx.reference_cache:
                ctx.reference_cache[key] = concept_affinity(ctx.pipe, ctx.world, n, seed)
            return {"concept_affinity": ctx.reference_cache[key], "reference_concept_affinity": ctx.reference_cache[key]}
        out = {"concept_affinity": concept_affinity(ctx.pipe, ctx.world, n, seed)}
        if ctx.reference_pipe is not None:
            if key not in ctx.reference_cache:
                ctx.reference_cache[key] = concept_affinity(ctx.reference_pipe, ctx.world, n, seed)
            out["reference_concept_affinity"] = ctx.reference_cache[key]
        return out


@dataclass(frozen=True)
class RealFID:
    """Real scale: FID (Inception features at eval.inception_path) of retain images vs real images."""

    def __call__(self, ctx: EvalContext) -> dict:
        gen = ctx.generated("retain")
        real = _real_images(ctx, "retain")
        path = ctx.cfg.eval.inception_path
        return {"fid": frechet_distance(inception_features(gen.images, path), inception_features(real, path))}


@dataclass(frozen=True)
class RealCLIPScore:
    """Real scale: CLIP score of retain images against their prompts (CLIP at eval.clip_path)."""

    def __call__(self, ctx: EvalContext) -> dict:
        gen = ctx.generated("retain")
        img, txt = clip_embeddings(ctx.cfg.eval.clip_path, gen.images, [r["prompt"] for r in gen.records])
        return {"clip_score": clip_score(img, txt)}


@dataclass(frozen=True)
class RealCMMD:
    """Real scale: CMMD, the MMD between CLIP image embeddings of retain images and real images."""

    def __call__(self, ctx: EvalContext) -> dict:
        gen = ctx.generated("retain")
        mine, _ = clip_embeddings(ctx.cfg.eval.clip_path, gen.images)
        real, _ = clip_embeddings(ctx.cfg.eval.clip_path, _real_images(ctx, "retain"))
        return {"cmmd": mmd(mine, real)}


def _real_images(ctx: EvalContext, set_name: str) -> np.ndarray:
    """One renderer image per generated image of the set, with the same labels."""
    size = ctx.world.cfg.size
    return np.stack([draw(Labels(r["shape"], r["colour"], r["style"]), np.random.default_rng([ctx.cfg.seed, 7, k, 0]),
                          size) for k, r in enumerate(ctx.records(set_name))])


METRICS = {  # name -> metric(ctx) -> {key: value}; names are eval.metrics values and `--metrics` choices
    "valid": Valid(),
    "leakage": Leakage(),
    "retention": Retention(),
    "adherence": Adherence(),
    "fd": FD(),
    "cp": CP(),
    "concept_affinity": ConceptAffinity(),
    "fid": RealFID(),
    "clip_score": RealCLIPScore(),
    "cmmd": RealCMMD(),
}


def run_metrics(ctx: EvalContext, names: list[str]) -> dict:
    metrics = [choose("metric", name, METRICS) for name in names]  # fail on a bad name before any sampling
    start = time.perf_counter()
    out: dict = {}
    for metric in metrics:
        out.update(metric(ctx))
    out["eval_images"] = ctx.n_generated
    out["eval_seconds"] = round(time.perf_counter() - start, 2)
    return out


def evaluate_model(pipe, world: ToyWorld, cfg: Config, reference_pipe=None, judge=None,
                   reference_cache: dict | None = None) -> dict:
    """Every metric in cfg.eval.metrics for `pipe` -> {key: float}; `cp` needs `reference_pipe`.

    Pass the same `reference_cache` dict to several calls with one reference model to draw its images once.
    """
    from safeprune.eval.judge import load_judge

    ctx = EvalContext(pipe, world, cfg, judge or load_judge(), reference_pipe, reference_cache)
    return run_metrics(ctx, cfg.eval.metrics)


# ----------------------------------------------------------------------------- sampling-free concept affinity


def swap_concept(prompt: str, kind: str, value: str, replacement: str) -> str:
    """The prompt with the concept word replaced (whole words only): 'a striped red circle' -> 'a plain red circle'."""
    return re.sub(rf"\b{re.escape(value)}\b", replacement, prompt)


@torch.no_grad()
def concept_affinity(pipe, world: ToyWorld, n_images: int = 64, seed: int = 0) -> float:
    """(E_swap - E_concept) / E_swap on real images of the forbidden concept(s).

    E = the model's denoising error (seed eq. 1; epsilon or v target as the scheduler says), averaged over
    n_images concept images at timesteps spread evenly over [100, 900] with fixed noise; E_concept uses the
    image's caption (it names the concept), E_swap the same caption with the concept replaced by an allowed
    value. Near 0: the prompt's concept word no longer helps the model denoise, i.e. it has lost the concept.
    """
    device = pipe.device
    images, captions, labels = world.batch("concept", 0, n_images)
    swapped = []
    for i, (caption, lb) in enumerate(zip(captions, labels)):
        kind, value = next((k, v) for k, v in world.forbidden_concepts if getattr(lb, k) == v)
        allowed = world.allowed(kind)
        swapped.append(swap_concept(caption, kind, value, allowed[i % len(allowed)]))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device, pipe.vae.dtype)
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    t = torch.linspace(100, 900, n_images).round().long().to(device)
    sched = pipe.scheduler
    noisy = sched.add_noise(latents, noise, t)
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        target = noise

    def error(prompts: list[str]) -> torch.Tensor:
        emb, _ = pipe.encode_prompt(prompts, device, 1, False)
        return (pipe.unet(noisy, t, encoder_hidden_states=emb).sample.float() - target.float()).square().mean((1, 2, 3))

    e_concept, e_swap = error(captions), error(swapped)
    return float((e_swap - e_concept).mean() / e_swap.mean())


# ----------------------------------------------------------------------------- teacher quality (issue 3 item 5)


def teacher_quality(pipe, world: ToyWorld, judge=None, n_images: int = 576, cfg: Config | None = None) -> dict:
    """Per-style shape / colour / style accuracy (and valid share) of `pipe` on n_images generated images.

    Prompts: every (style, shape, colour) in training templates, cycled; image k has seed cfg.seed + k; sampler
    settings from cfg.sample. Returns {"per_style": {style: {shape, colour, style, valid, n}}, "overall": {...},
    "min_accuracy", "n_images", "seconds"}.
    """
    from safeprune.eval.judge import load_judge
    from safeprune.recipes.generate import generate_images

    cfg = cfg or Config()
    judge = judge or load_judge()
    prompts = _interleave_by_style(world.prompts("forget") + world.prompts("retain"))
    records = [prompts[k % len(prompts)] for k in range(n_images)]
    start = time.perf_counter()
    images = generate_images(pipe, [r["prompt"] for r in records], [cfg.seed + k for k in range(n_images)],
                             cfg.sample.steps, cfg.sample.guidance, cfg.sample.batch_size,
                             precision=cfg.sample.precision)
    judged = judge.predict(images)

    def scores(idx: list[int]) -> dict:
        out = {a: float(np.mean([judged[a][i] == records[i][a] for i in idx])) for a in ("shape", "colour", "style")}
        return {**out, "valid": float(np.mean(judged["valid"][idx])), "n": len(idx)}

    styles = sorted({r["style"] for r in records})
    per_style = {s: scores([i for i, r in enumerate(records) if r["style"] == s]) for s in styles}
    return {"per_style": per_style, "overall": scores(list(range(n_images))),
            "min_accuracy": min(v[a] for v in per_style.values() for a in ("shape", "colour", "style")),
            "n_images": n_images, "seconds": round(time.perf_counter() - start, 1)}
