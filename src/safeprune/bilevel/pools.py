"""The fixed inputs of the diffusion problem (`Pools`): latent pools of the fine-tuning and concept images and
one text-embedding table for every prompt a run uses, built once before training.

Embeddings of fixed prompts are computed once (the paper's code does the same): captions, concept targets
and anchors, and the empty prompt share one table indexed by row, (P, L, D) for SD 1.x/2.x or a
PromptEmbeddings of P rows (safeprune.backbones). In stream mode (`safeprune.data.stream`, every family) the
fine-tuning images are instead VAE-encoded afresh every step, and each draw writes its captions' embeddings,
encoded by the same `backbone.encode`, into rows reserved at the end of that table.
"""

from __future__ import annotations

import warnings

import torch

from safeprune.backbones import BACKBONES
from safeprune.bilevel.problem import Pools
from safeprune.config import Config
from safeprune.data.datasets import encode_pool, open_image_captions
from safeprune.data.records import Columns
from safeprune.data.stream import data_mode, open_stream_pool
from safeprune.data.toyworld import ToyWorld
from safeprune.unlearning.anchors import ToyAnchorImages
from safeprune.unlearning.concepts import derive_concepts, pair_images
from safeprune.utils import DTYPES, numpy_rng


def upper_images(ft, unlearning) -> str:
    """Where the upper level's x_t come from (finetune.upper.images): concept | anchor | student; "" = the
    unlearning loss's own choice (`images`: anchor for concept ablation, else concept)."""
    return ft.upper.images or getattr(unlearning, "images", "concept")


def build_pools(cfg: Config, pipe, unlearning, data, concept_data, device, backbone=None):
    """Latent pools + one embedding table for every prompt; returns (Pools, the concepts suppressed).

    `backbone` (safeprune.backbones; None = SD 1.x/2.x) encodes the prompts: a (P, L, D) tensor for SD, a
    PromptEmbeddings of the same rows for families with pooled text or added conditioning."""
    backbone = backbone or BACKBONES["sd"]
    ft = cfg.finetune
    world = ToyWorld(cfg.toyworld, cfg.seed)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    # finetune.resolution, else the image side the VAE maps onto the UNet's native latent size
    size = ft.resolution or backbone.native_latent_size(pipe) * vae_scale
    missing = [flag for flag, given, needed in (("--data", data, True), ("--concept-data", concept_data,
                                                unlearning is not None)) if needed and given is None]
    if missing and size != cfg.toyworld.size:  # legal, but a teacher of another image size is surely not a toy
        warnings.warn(f"no {' / '.join(missing)} given: fine-tuning a {size} px teacher on the toy world's "
                      f"{cfg.toyworld.size} px images; pass your own image folder or dataset", stacklevel=1)
    vae = pipe.vae.to(device).eval()

    sources = {"streaming": ft.data.streaming, "hub": ft.data.hub_data}
    if data_mode(ft, data) == "stream":  # fresh images every step, VAE-encoded per batch (safeprune.data.stream)
        lower = open_stream_pool(data, ft, world=world, pipe=pipe, backbone=backbone, vae=vae, resolution=size,
                                 seed=cfg.seed, device=device, dtype=DTYPES[ft.teacher_dtype])
    else:
        columns = Columns(ft.data.image_column, ft.data.caption_column)  # of paths.data (concept folders: defaults)
        lower_set = open_image_captions(data, world=world, split="finetune", n_toy=ft.data.pool, size=size,
                                        columns=columns, **sources)
        lower = encode_pool(lower_set, ft.data.pool, vae, rng=numpy_rng(cfg.seed), device=device)
        lower.source_size = len(lower_set)  # the pool samples data.pool of these (summary.json reports both)

    concepts, concept, pairing = [], None, []
    if unlearning is not None:
        concept_set = open_image_captions(concept_data, world=world, split="concept", n_toy=ft.data.concept_pool,
                                          size=size, **sources)
        concept = encode_pool(concept_set, ft.data.concept_pool, vae, rng=numpy_rng(cfg.seed, "concept"), device=device)
        concepts = list(ft.concepts)
        if concepts:
            pairing = pair_images(concepts, concept.captions)
        else:  # derived from the concept images' captions (see safeprune.unlearning.concepts)
            concepts, pairing = derive_concepts(concept.captions, concept.labels, world.forbidden)
        if upper_images(ft, unlearning) == "anchor":  # concept ablation: x ~ the anchor distribution
            concept, pairing = _anchor_pool(cfg, world, concepts, pairing, size, vae, device, sources)

    prompts = list(dict.fromkeys(["", *lower.captions, *(c.target for c in concepts), *(c.anchor for c in concepts)]))
    row = {p: i for i, p in enumerate(prompts)}
    embeddings = backbone.encode(pipe, prompts, device, size)
    lower_prompt = torch.tensor([row[c] for c in lower.captions], dtype=torch.long)
    if hasattr(lower, "attach"):  # stream: rows that each draw fills with its own captions' embeddings
        embeddings, lower_prompt = lower.attach(embeddings)
    pools = Pools(lower=lower, lower_prompt=lower_prompt, embeddings=embeddings,
                  null_prompt=row[""])
    if concept is not None:
        pools.concept = concept
        pools.concept_target = torch.tensor([row[concepts[k].target] for k in pairing])
        pools.concept_anchor = torch.tensor([row[concepts[k].anchor] for k in pairing])
    return pools, concepts


def _anchor_pool(cfg: Config, world, concepts, pairing, size, vae, device, sources):
    """(anchor-image pool, its concept index per image) for losses that noise anchor images (`ablation`)."""
    n, anchor_data = cfg.finetune.data.concept_pool, cfg.paths.anchor_data or None
    if anchor_data is None:  # toy concept images (checked in `finetune`): rendered anchors, image i aligned with
        # concept image i (the same pool indices), so both pair with the same concept
        anchors = ToyAnchorImages(world, n, size)
        return encode_pool(anchors, n, vae, rng=numpy_rng(cfg.seed, "concept"), device=device), pairing
    anchor_set = open_image_captions(anchor_data, world=world, split="concept", n_toy=n, size=size, **sources)
    anchors = encode_pool(anchor_set, n, vae, rng=numpy_rng(cfg.seed, "anchor"), device=device)
    return anchors, pair_images(concepts, anchors.captions, by="anchor")
