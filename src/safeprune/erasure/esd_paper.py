"""`esd_paper`: Erased Stable Diffusion (Gandikota et al., ICCV 2023) as published and as the seed paper's
two-stage baseline ran it (authors' train-esd.py; seed paper Sec. 5: 1000 steps, lr 1e-5).

Per iteration (ESD eq. 3-5): draw a concept c and a stop step k ~ U{0, ..., n-1} of an n-step DDIM schedule
(eta 0); sample x_T ~ N(0, I) and denoise it k steps WITH THE MODEL BEING EDITED under c at guidance
`start_guidance` (the authors' quick_sample_till_t), giving x_t at t = timesteps[k]; then regress

  eps_theta(x_t, t, c)  ->  eps_0(x_t, t, r) - eta (eps_0(x_t, t, c) - eps_0(x_t, t, r))

with eps_0 the FROZEN STARTING MODEL (not the unpruned teacher: the model the method is handed), r the empty
prompt (`reference: null`, the paper) or c's anchor (`reference: anchor`, a variant). Adam, MSE, batch 1 in the
paper. ESD-x moves cross-attention only (`params: xattn`, the authors' choice for artistic styles), ESD-u
everything but cross-attention, the output conv and the time embedding (`noxattn`), `full` everything.

One deliberate difference: the CompVis script queries the models at DDPM step ~ k/n * 1000 while x_t sits at
timesteps[k] ~ (n - k)/n * 1000; the authors' later diffusers scripts (esd_sd.py) use timesteps[k], as here.
With batch_size > 1 the batch shares one k (one sampling run), each row has its own concept and x_T.
Randomness comes from a generator seeded by (seed, step), so a run is a pure function of its seed.

Every family (safeprune.backbones): x_t comes from the family's own sampler (DDIM on the DDPM schedule; the
flow-matching Euler sampler of SD3 / Flux, Flux guided by its guidance embedding; safeprune.erasure.sampling)
at sample.resolution, and eq. 5 is regressed in the family's prediction space (eps, v, or the flow velocity):
its weights (1 + eta, -eta) sum to 1 and every prediction is affine in eps at a fixed (x_t, t), so the
combination of the frozen model's velocities IS the eps-space target mapped to velocity. ESD-x is the attention
that reads the text (`is_cross_attention`: UNet attn2, MMDiT add_k_proj / add_v_proj); ESD-u leaves out the
family's output head and time embedding (`output_and_time`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from safeprune.errors import check


def _in_set(which: str, name: str, backbone) -> bool:
    """Whether parameter `name` is in ESD's set `which` on `backbone`'s models."""
    from safeprune.backbones import is_cross_attention

    if which == "xattn":
        return is_cross_attention(name)
    if which == "noxattn":
        return not is_cross_attention(name) and not name.startswith(backbone.output_and_time)
    return True  # full


def trainable(unet, which: str, backbone=None) -> list[torch.nn.Parameter]:
    """ESD's parameter set `which` (xattn | noxattn | full) of the denoiser (`backbone`: its family; None = SD)."""
    from safeprune.backbones import BACKBONES

    backbone = backbone or BACKBONES["sd"]
    params = [p for n, p in unet.named_parameters() if _in_set(which, n, backbone)]
    check(bool(params), f"the model has no parameters in ESD's set {which!r} (pruned away?); set "
                        "unlearn.esd_paper.params to noxattn or full")
    return params


def sample_xt(unet, scheduler, emb_c, emb_null, stop: int, guidance: float, generator: torch.Generator,
              backbone=None, latent_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after `stop` guided steps of `scheduler` (timesteps set) from x_T ~ N(0, I) (generator), and t = the
    timestep x_t is at, (B,).

    emb_c: B concept rows ((B, L, D) or a PromptEmbeddings), emb_null: one row; `backbone` the family (None = SD),
    `latent_shape` (C, h, w) of x_T (default: the UNet's in_channels x sample_size^2).
    """
    from safeprune.backbones import BACKBONES
    from safeprune.erasure.sampling import guided_run, start_noise

    backbone = backbone or BACKBONES["sd"]
    if latent_shape is None:
        latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    b = emb_c.shape[0]
    x = start_noise((b, *latent_shape), generator, scheduler, emb_c.device)
    x = guided_run(backbone, unet, scheduler, x, emb_c, emb_null, guidance, stop)
    return x, scheduler.timesteps[stop].repeat(b).to(x.device)


@dataclass(frozen=True)
class ESDPaper:
    steps: int = 1000
    lr: float = 1e-5
    eta: float = 1.0
    params: str = "xattn"
    batch_size: int = 1
    sample_steps: int = 0  # 0 = sample.steps
    start_guidance: float = 3.0
    reference: str = "null"

    @classmethod
    def from_config(cls, cfg) -> ESDPaper:
        """Settings from the run config's `unlearn.esd_paper` section."""
        c = cfg.unlearn.esd_paper
        return cls(c.steps, c.lr, c.eta, c.params, c.batch_size, c.sample_steps, c.start_guidance, c.reference)

    def schedule_length(self, ctx) -> int:
        return self.sample_steps or ctx.cfg.sample.steps  # 0 = the model's own sampler (sample.steps)

    def __call__(self, unet, ctx) -> dict:
        import time

        from tqdm.auto import tqdm

        from safeprune.backbones.base import cat_embeddings
        from safeprune.bilevel.problem import step_generator
        from safeprune.erasure import check_concepts
        from safeprune.erasure.sampling import erasure_latent_shape
        from safeprune.losses.base import mse_per_sample
        from safeprune.pruning import reapply_masks

        check_concepts(ctx.concepts)
        start = time.perf_counter()
        backbone = ctx.backbone
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)  # eps_0: the model as handed over
        unet.requires_grad_(False)
        params = trainable(unet, self.params, backbone)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.lr)  # the authors' optimiser (no weight decay)
        n_steps = self.schedule_length(ctx)
        shape = erasure_latent_shape(ctx)
        targets = ctx.embed([c.target for c in ctx.concepts])  # (P, L, D) or P rows of PromptEmbeddings
        refs = ctx.embed([c.anchor if self.reference == "anchor" else "" for c in ctx.concepts])
        null = ctx.embed([""])
        counts = {"student_fwd": 0, "student_bwd": 0, "student_sample_fwd": 0, "frozen_fwd": 0}
        losses = []
        unet.train()
        for step in tqdm(range(self.steps), desc="unlearn esd_paper", unit="it", disable=not ctx.progress,
                         dynamic_ncols=True):
            gen = step_generator(ctx.cfg.seed, 0, step, "esd_paper")
            stop = int(torch.randint(n_steps, (1,), generator=gen))
            idx = torch.randint(len(ctx.concepts), (self.batch_size,), generator=gen)
            emb_c, emb_r = targets[idx], refs[idx]
            # a fresh sampler per run: flow-matching schedulers count the steps they took
            scheduler = backbone.sampling_scheduler(ctx.pipe.scheduler, unet, n_steps, shape)
            x_t, t = sample_xt(unet, scheduler, emb_c, null, stop, self.start_guidance, gen, backbone, shape)
            counts["student_sample_fwd"] += backbone.guidance_rows * self.batch_size * stop
            with torch.no_grad():
                pred_c, pred_r = backbone.predict(frozen, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                  cat_embeddings([emb_c, emb_r])).chunk(2)
            counts["frozen_fwd"] += 2 * self.batch_size
            # eq. 5 in the family's prediction space: the weights (1 + eta, -eta) sum to 1, so the combination of
            # velocities is the eps-space target mapped to velocity (safeprune.backbones.base)
            target = pred_r - self.eta * (pred_c - pred_r)
            loss = mse_per_sample(backbone.predict(unet, x_t, t, emb_c), target).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            reapply_masks(unet)  # a magnitude / ConceptPrune student keeps its zeros
            counts["student_fwd"] += self.batch_size
            counts["student_bwd"] += self.batch_size
            losses.append(float(loss.detach()))
        unet.requires_grad_(True).eval()
        tail = losses[-max(1, len(losses) // 10):]
        return {"steps": self.steps, "batch_size": self.batch_size, "params": self.params, "sample_steps": n_steps,
                "trained_params": sum(p.numel() for p in params), "loss_first": losses[0],
                "loss_last10pct": sum(tail) / len(tail), "counts": counts,
                "seconds": round(time.perf_counter() - start, 2)}
