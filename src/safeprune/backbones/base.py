"""What every backbone family shares: prompt embeddings with more than one tensor, the two training targets
(DDPM eps / v, and rectified-flow velocity) with their noise schedules, and the defaults of `Backbone`.

Noise schedules (seed paper eq. 1 generalised to the family's prediction space):
  DDPM (SD 1.x/2.x, SDXL)   x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t ~ U{0..T-1};
                            target eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 for v-prediction
  flow matching (SD3, Flux) x_t = (1 - s) x_0 + s eps, s = sigma(t) of the scheduler's table; target
                            v = eps - x_0 (Esser et al. 2024, eq. 3; diffusers' train_dreambooth_sd3.py /
                            train_dreambooth_flux.py), t drawn logit-normal (SD3) or uniform (Flux)
Both predictions are affine in eps at a fixed (x_t, t): v_flow = (eps - x_t) / (1 - s). So ESD's guided
target eps_r - eta (eps_c - eps_r), whose coefficients sum to 1, maps to the same combination of velocities:
the unlearning losses apply unchanged in every family's prediction space (tests/backbones checks it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text conditioning of P prompts: every field has the prompt on its first axis, so indexing rows (or None,
    to add a batch axis) applies to all of them at once, as indexing one (P, L, D) tensor does for SD 1.x/2.x."""

    hidden: torch.Tensor  # (P, L, D): per-token states the denoiser attends to
    pooled: torch.Tensor | None = None  # (P, D2): pooled text embedding (SDXL, SD3, Flux)
    # micro-conditioning: SDXL's (P, 6) (original size, crop, target size); PixArt-alpha 1024's (P, 3) (height,
    # width, aspect ratio)
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (P, L) long, 1 = token, 0 = padding: the text attention mask (PixArt's T5)

    def _map(self, fn) -> PromptEmbeddings:
        return PromptEmbeddings(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                   for f in dataclasses.fields(self)})

    def __getitem__(self, index) -> PromptEmbeddings:
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, *args, **kwargs) -> PromptEmbeddings:
        """Like Tensor.to; a dtype applies to the float fields only."""
        return self._map(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else
                         t.to(*[a for a in args if not isinstance(a, torch.dtype)],
                              **{k: v for k, v in kwargs.items() if k != "dtype"}))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape


def cat_embeddings(parts: list):
    """Prompt rows of several (P_i, L, D) tensors or PromptEmbeddings, concatenated along the prompt axis."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return PromptEmbeddings(**{f.name: None if getattr(parts[0], f.name) is None else
                               torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0])})


def encode_in_chunks(encoders, device, prompts: list[str], encode, size: int = 64):
    """(hidden (P, L, D), pooled (P, D2)) float32 of `prompts`, encoded `size` at a time by `encode(chunk) ->
    (hidden, pooled)` (a family's call of its pipeline's `encode_prompt`), after putting `encoders` on `device`
    in eval mode (None entries, e.g. an absent T5, are skipped). A non-float second tensor (PixArt's attention
    mask (P, L)) keeps its dtype."""
    for encoder in encoders:
        if encoder is not None:
            encoder.to(device).eval()
    hidden, pooled = [], []
    for start in range(0, len(prompts), size):
        emb, pool = encode(list(prompts[start:start + size]))
        hidden.append(emb.float())
        pooled.append(pool.float() if pool.is_floating_point() else pool)
    return torch.cat(hidden), torch.cat(pooled)


# ----------------------------------------------------------------------------- noise schedules


@dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """DDPM noising of a diffusers scheduler with `alphas_cumprod` (DDPM/DDIM/PNDM configs); eps or v target."""

    scheduler: object  # a DDPMScheduler (training)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def noised(self, latents: torch.Tensor, gen: torch.Generator, device) -> tuple:
        """(noise, timesteps (B,) long, x_t) of latents (B, C, h, w); draws noise, then t, from `gen`."""
        noise = torch.randn(latents.shape, generator=gen).to(device)
        timesteps = torch.randint(self.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
        return noise, timesteps, self.scheduler.add_noise(latents, noise, timesteps)

    def noised_at(self, latents, noise, timesteps) -> torch.Tensor:
        """x_t at given timesteps (B,) and noise."""
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        return compute_snr(self.scheduler, timesteps)

    def _coefficients(self, x_t, timesteps):
        a = self.scheduler.alphas_cumprod.to(x_t.device)[timesteps].float().view(-1, *[1] * (x_t.dim() - 1))
        return a.sqrt(), (1 - a).sqrt()

    def prediction_from_eps(self, eps, x_t, timesteps) -> torch.Tensor:
        """The model output that means noise estimate `eps` at (x_t, t): eps itself, or v."""
        if self.prediction_type != "v_prediction":
            return eps
        sa, s1a = self._coefficients(x_t, timesteps)
        x0 = (x_t - s1a * eps) / sa
        return sa * eps - s1a * x0


@dataclass(frozen=True, eq=False)
class FlowMatchSchedule:
    """Rectified-flow noising on a FlowMatchEulerDiscreteScheduler's (shifted) sigma table; velocity target."""

    scheduler: object  # a FlowMatchEulerDiscreteScheduler (its training-time table: timesteps, sigmas)
    density: str = "logit_normal"  # how t is drawn: logit_normal (SD3's trainer default) | uniform (Flux's)
    prediction_type: str = "flow_matching"

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def _tables(self, device):
        # the training table, as diffusers' trainers read it from an untouched copy of the scheduler
        sigmas = self.scheduler.sigmas[:self.num_train_timesteps]
        return self.scheduler.timesteps[:self.num_train_timesteps].to(device), sigmas.to(device)

    def noised(self, latents: torch.Tensor, gen: torch.Generator, device) -> tuple:
        """(noise, timesteps (B,) float in (0, T], x_t); t indexes the scheduler's table, as diffusers' trainers do
        (hand-written so the draw comes from `gen`: diffusers' compute_density_for_timestep_sampling takes none)."""
        noise = torch.randn(latents.shape, generator=gen).to(device)
        n = latents.shape[0]
        u = torch.sigmoid(torch.randn(n, generator=gen)) if self.density == "logit_normal" else torch.rand(n, generator=gen)
        index = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1).to(device)
        timesteps, sigmas = self._tables(device)
        sigma = self.sigma(index, sigmas, latents)
        return noise, timesteps[index], (1.0 - sigma) * latents + sigma * noise

    def sigma(self, index, sigmas, like) -> torch.Tensor:
        return sigmas[index].to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    def sigma_of(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma(t) (B, 1, 1, 1) of timesteps from this table."""
        table, sigmas = self._tables(timesteps.device)
        index = (table[None, :] - timesteps.float()[:, None]).abs().argmin(1)
        return self.sigma(index, sigmas, like)

    def noised_at(self, latents, noise, timesteps) -> torch.Tensor:
        """x_t at given timesteps (B,) (the nearest entries of the table) and noise."""
        sigma = self.sigma_of(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        return noise - latents

    def snr(self, timesteps):  # not used: flow-matching runs are weighted 1 (diffusers' trainers' default)
        return None

    def prediction_from_eps(self, eps, x_t, timesteps) -> torch.Tensor:
        """Velocity meaning noise estimate eps at (x_t, t): x_0 = (x_t - s eps) / (1 - s), v = eps - x_0."""
        s = self.sigma_of(timesteps, x_t)
        return eps - (x_t - s * eps) / (1.0 - s)


def training_schedule(scheduler, density: str = "logit_normal"):
    """The schedule object of a training scheduler: flow matching for FlowMatch* schedulers, else DDPM."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowMatchSchedule(scheduler, density)
    return DDPMSchedule(scheduler)
