"""`esd`, `esd_xattn`, `esd_anchor`, `ablation`: the bilevel upper-level losses (safeprune.unlearning) run alone.

min_theta L_CU(theta) for a fixed number of AdamW steps, with the FROZEN STARTING MODEL as the score source
eps_T (the model handed to `safeprune unlearn`, which has no separate teacher) and x_t = noised latents of
concept images, exactly as one upper step of the bilevel solvers draws them (`DiffusionProblem.upper`, the
same per-step seeding). Inside `finetune --method two_stage` these names keep today's schedule instead
(the unpruned teacher as score source, see safeprune.bilevel.solvers.TwoStage). Every family: its training
schedule and prediction space (safeprune.backbones), as the bilevel upper step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UpperLoss:
    name: str  # a safeprune.unlearning.UNLEARNING key
    steps: int = 30
    lr: float = 1e-3
    batch_size: int = 16
    eta: float = 2.0
    concept_pool: int = 256

    @classmethod
    def from_config(cls, name: str, cfg) -> UpperLoss:
        """Loss `name` with the settings of the run config's `unlearn.loss` section (shared by every loss)."""
        c = cfg.unlearn.loss
        return cls(name, c.steps, c.lr, c.batch_size, c.eta, c.concept_pool)

    def _pools(self, unet, ctx):
        from safeprune.bilevel.problem import Pools
        from safeprune.data.datasets import encode_pool, open_image_captions
        from safeprune.unlearning.concepts import derive_concepts, pair_images
        from safeprune.utils import numpy_rng

        pipe = ctx.pipe
        # sample.resolution, as every erasure method here; 0 = the image side of the model's own latent size
        size = ctx.cfg.sample.resolution or \
            ctx.backbone.native_latent_size(pipe) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        images = open_image_captions(ctx.concept_data, world=ctx.world, split="concept", n_toy=self.concept_pool,
                                     size=size)
        pool = encode_pool(images, self.concept_pool, pipe.vae.to(ctx.device).eval(),
                           rng=numpy_rng(ctx.cfg.seed, "concept"), device=ctx.device)
        if ctx.derived:  # every image under its own caption, anchored on the same scene without the concept
            concepts, pairing = derive_concepts(pool.captions, pool.labels, ctx.world.forbidden)
        else:
            concepts, pairing = ctx.concepts, pair_images(ctx.concepts, pool.captions)
        prompts = list(dict.fromkeys(["", *(c.target for c in concepts), *(c.anchor for c in concepts)]))
        row = {p: i for i, p in enumerate(prompts)}
        return Pools(lower=None, lower_prompt=torch.zeros(0, dtype=torch.long), embeddings=ctx.embed(prompts),
                     null_prompt=row[""], concept=pool,
                     concept_target=torch.tensor([row[concepts[k].target] for k in pairing]),
                     concept_anchor=torch.tensor([row[concepts[k].anchor] for k in pairing])), concepts

    def __call__(self, unet, ctx) -> dict:
        import time

        from tqdm.auto import tqdm

        from safeprune.bilevel.problem import DiffusionProblem
        from safeprune.config import UnlearnLossConfig
        from safeprune.erasure import check_concepts
        from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss
        from safeprune.pruning import reapply_masks
        from safeprune.unlearning import build_unlearning, select_parameters

        check_concepts(ctx.concepts)
        start = time.perf_counter()
        loss = build_unlearning(self.name, UnlearnLossConfig(name=self.name, eta=self.eta))
        pools, concepts = self._pools(unet, ctx)
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
        backbone = ctx.backbone  # the family's noising, target and denoiser call (DDPM eps/v, flow velocity)
        scheduler = backbone.training_scheduler(ctx.pipe)
        unet.train()
        optimizer = torch.optim.AdamW(select_parameters(unet, loss.params), lr=self.lr)
        denoise = DenoisingLoss(scheduler, 0.0, timestep_density=backbone.timestep_density)
        problem = DiffusionProblem(  # only `upper` is called: the lower-level loss is a placeholder
            student=unet, student_core=unet, teacher=frozen, scheduler=scheduler,
            lower_loss=LowerLevelLoss(denoise, FeatureKD(())), pools=pools,
            unlearning=loss, upper_batch_size=self.batch_size, seed=ctx.cfg.seed, backbone=backbone)
        values = []
        for step in tqdm(range(self.steps), desc=f"unlearn {self.name}", unit="it", disable=not ctx.progress,
                         dynamic_ncols=True):
            values.append(problem.upper(step)["cu"])
            optimizer.step()
            unet.zero_grad(set_to_none=True)
            reapply_masks(unet)
        unet.eval()
        counts = {k: v for k, v in problem.counts.items() if v}
        return {"steps": self.steps, "batch_size": self.batch_size, "cu_first": values[0], "cu_last": values[-1],
                "concepts": len(concepts), "counts": counts, "seconds": round(time.perf_counter() - start, 2)}
