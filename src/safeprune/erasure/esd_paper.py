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
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from safeprune.errors import check

PARAMETER_SETS = {
    "xattn": lambda name: ".attn2." in f".{name}",
    "noxattn": lambda name: ".attn2." not in f".{name}" and not name.startswith(("conv_out.", "time_embedding.")),
    "full": lambda name: True,
}


def trainable(unet, which: str) -> list[torch.nn.Parameter]:
    keep = PARAMETER_SETS[which]
    params = [p for n, p in unet.named_parameters() if keep(n)]
    check(bool(params), f"the model has no parameters in ESD's set {which!r} (pruned away?); set "
                        "unlearn.esd_paper.params to noxattn or full")
    return params


@torch.no_grad()
def sample_xt(unet, scheduler, emb_c: torch.Tensor, emb_null: torch.Tensor, stop: int, guidance: float,
              generator: torch.Generator, shape: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t after `stop` guided DDIM steps from x_T ~ N(0, I) (generator), and t = the timestep x_t is at.

    emb_c (B, L, D) concept embeddings, emb_null (1, L, D); scheduler has its timesteps set; shape (C, h, w) of
    the latents (None = the UNet's in_channels x sample_size^2).
    """
    cfg = unet.config
    b = emb_c.shape[0]
    shape = tuple(shape) if shape is not None else (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(b, *shape, generator=generator).to(emb_c.device)
    x = x * scheduler.init_noise_sigma
    context = torch.cat([emb_null.expand(b, -1, -1), emb_c])
    for t in scheduler.timesteps[:stop]:
        eps_u, eps_c = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
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

        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        from safeprune.bilevel.problem import step_generator
        from safeprune.erasure import check_concepts
        from safeprune.losses.base import mse_per_sample
        from safeprune.pruning import reapply_masks

        check_concepts(ctx.concepts)
        start = time.perf_counter()
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)  # eps_0: the model as handed over
        unet.requires_grad_(False)
        params = trainable(unet, self.params)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.lr)  # the authors' optimiser (no weight decay)
        scheduler = DDIMScheduler.from_config(ctx.pipe.scheduler.config)
        n_steps = self.schedule_length(ctx)
        scheduler.set_timesteps(n_steps)
        targets = ctx.embed([c.target for c in ctx.concepts])  # (P, L, D)
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
            x_t, t = sample_xt(unet, scheduler, emb_c, null, stop, self.start_guidance, gen)
            counts["student_sample_fwd"] += 2 * self.batch_size * stop
            with torch.no_grad():
                eps_c, eps_r = frozen(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                      encoder_hidden_states=torch.cat([emb_c, emb_r])).sample.chunk(2)
            counts["frozen_fwd"] += 2 * self.batch_size
            target = eps_r - self.eta * (eps_c - eps_r)
            loss = mse_per_sample(unet(x_t, t, encoder_hidden_states=emb_c).sample, target).mean()
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
