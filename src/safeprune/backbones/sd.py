"""`sd`: Stable Diffusion 1.x / 2.x (StableDiffusionPipeline, UNet2DConditionModel, one CLIP text encoder).

Rombach et al. 2022: eps (SD 1.x) or v (SD 2.x) prediction on the DDPM schedule (eq. 1 of the seed paper);
the UNet cross-attends to the text encoder's last hidden states; feature KD matches every down, mid and up
block output (safeprune.models.hooks); ESD-x and UCE edit the cross-attention `attn2`. This is also the base
class of every family: its members are the `Backbone` contract (see safeprune.backbones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from safeprune.backbones.base import training_schedule
from safeprune.errors import UserError, check
from safeprune.models.hooks import first_output, match_blocks

CLIP_TOKENS = 77  # CLIP's context length: what SD's UNet cross-attends to


@dataclass(frozen=True)
class SD:
    name: str = "sd"
    label: str = "an SD 1.x / 2.x UNet"  # how messages name the family
    pipelines: tuple[str, ...] = ("StableDiffusionPipeline",)  # model_index.json _class_name values it loads
    pipeline_class: str = "StableDiffusionPipeline"  # what it loads and assembles
    denoiser: str = "unet"  # the pipeline component that is pruned and trained
    denoiser_classes: tuple[str, ...] = ("UNet2DConditionModel", "PrunedUNet2DConditionModel")
    # parameter-name fragments of the attention that reads the text (ESD-x's and UCE's edit set)
    cross_attention: tuple[str, ...] = (".attn2.",)
    # the parameter-name prefixes of the output head and the time embedding, which ESD-u leaves alone (the
    # authors' train-esd.py trains neither `out.` nor `time_embed`)
    output_and_time: tuple[str, ...] = ("conv_out.", "time_embedding.")
    # False: the cross-attention keys/values read the prompt embeddings themselves (UNets); True: they read the
    # text stream at their block (MMDiT), whose inputs UCE collects with hooks
    text_stream: bool = False
    guidance_rows: int = 2  # denoiser rows per guided prediction (`guided`): the classifier-free pair
    load_kwargs: dict = field(default_factory=lambda: {"safety_checker": None, "requires_safety_checker": False})
    timestep_density: str = "uniform"  # flow families: how training draws t (safeprune.backbones.base)

    # -- the pipeline
    @property
    def text_tokens(self) -> int:
        """The text length the family's stock pipeline encodes by default (what `prune` counts MACs at)."""
        return CLIP_TOKENS

    def owns_config(self, config: dict) -> bool:
        """Whether a denoiser config.json belongs to this family (bare UNet folders, --unet-config)."""
        return config.get("_class_name", "UNet2DConditionModel") in self.denoiser_classes \
            and config.get("addition_embed_type") is None

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_pipeline(self, folder, components: dict):
        """The stock diffusers pipeline of this family from a pipeline folder (offline, safetensors only).

        Components model_index.json lists as [null, null] load as None (SD3 without its optional T5: diffusers
        wants them named, `text_encoder_3=None`)."""
        import json
        from pathlib import Path

        index = Path(folder) / "model_index.json"
        spec = json.loads(index.read_text()) if index.is_file() else {}
        absent = {k: None for k, v in spec.items() if v == [None, None] and k not in components}
        try:
            return self.pipeline_cls().from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                       **{**absent, **self.load_kwargs, **components})
        except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            raise UserError(f"cannot load a {self.pipeline_class} from {str(folder)!r}: "
                            f"{str(err).strip().splitlines()[0]}") from err

    def assemble(self, pipe, denoiser):
        """A pipeline with `pipe`'s other components around another denoiser (the student)."""
        extra = {k: v for k, v in self.load_kwargs.items() if k not in pipe.components}
        return self.pipeline_cls()(**{**pipe.components, self.denoiser: denoiser}, **extra)

    def denoiser_of(self, pipe):
        return getattr(pipe, self.denoiser)

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def schedule(self, scheduler):
        return training_schedule(scheduler, self.timestep_density)

    def check_prediction_type(self, scheduler_config, expected: str, name) -> None:
        """A preset that names the prediction type (sd21.yaml: v_prediction) must get a teacher that has it.

        Training a v-prediction teacher's student on the epsilon target (or back) silently ruins it; the usual
        cause is a look-alike checkpoint (stable-diffusion-2-1-base is epsilon, stable-diffusion-2-1 is v)."""
        actual = scheduler_config.get("prediction_type", "epsilon")
        check(not expected or actual == expected,
              f"teacher {str(name)!r} predicts {actual!r} (its scheduler config) but model.prediction_type={expected!r}; "
              f"pass the intended checkpoint or set model.prediction_type={actual} (or '' to accept the teacher's)")

    # -- text and the denoiser call
    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device, resolution: int = 0):
        """Conditioning of `prompts` (rows indexable by prompt), float32 on `device`: here (P, L, D) hidden states."""
        from safeprune.data.datasets import embed_prompts

        return embed_prompts(prompts, pipe.tokenizer, pipe.text_encoder.to(device).eval(), device=device)

    def predict(self, model, x_t, timesteps, emb) -> torch.Tensor:
        """The denoiser's prediction (B, C, h, w) in the family's prediction space."""
        return model(x_t, timesteps, encoder_hidden_states=emb).sample

    def last_word_index(self, pipe, prompts: list[str]) -> list[int]:
        """Index of each prompt's last word token (before EOS) in the text sequence the denoiser reads; 0 for ''.
        CLIP's tokens lead the sequence in every CLIP-conditioned family (SD3 appends T5's after them)."""
        tokenizer = pipe.tokenizer
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return [max(int(n) - 2, 0) for n in tok.attention_mask.sum(1)]  # BOS, words, EOS: the last word is n - 2

    # -- partial sampling (the erasure methods' own runs: safeprune.erasure.sampling)
    def sampling_scheduler(self, scheduler, denoiser, steps: int, latent_shape: tuple[int, ...]):
        """A deterministic sampler on the model's noise schedule with `steps` timesteps set: DDIM (eta 0)."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def guided(self, model, x, t, emb, null, guidance: float) -> torch.Tensor:
        """The classifier-free-guided prediction at (x (B, C, h, w), t) under `emb` (B rows) against `null` (1 row):
        one denoiser call on [null; emb], as the family's pipeline batches it."""
        from safeprune.backbones.base import cat_embeddings

        b = x.shape[0]
        context = cat_embeddings([null[torch.zeros(b, dtype=torch.long)], emb])
        pred_u, pred_c = self.predict(model, torch.cat([x, x]), t.expand(2 * b), context).chunk(2)
        return pred_u + guidance * (pred_c - pred_u)

    def cross_attention_input(self, denoiser, hidden: torch.Tensor) -> torch.Tensor:
        """What the cross-attention key/value projections read for prompt states `hidden` (P, L, D) when every
        block reads the same text (UCE's inputs): the states themselves in a UNet."""
        return hidden

    # -- feature distillation
    def match_blocks(self, teacher, student, kept: dict | None = None) -> list[tuple[str, str]]:
        """(teacher block, student block) names whose outputs feature KD compares. `kept`: a depth-pruned student's
        {stack: teacher block of each student block} (pruning.depth.kept_blocks); UNets pair whole down / mid /
        up blocks, which depth pruning keeps, so it does not change their pairs."""
        return match_blocks(teacher, student)

    feature = staticmethod(first_output)  # a block's feature map from its forward output

    # -- sampling
    def latent_shape(self, pipe, resolution: int = 0) -> tuple[int, int, int]:
        """(C, h, w) of one image's latents; resolution 0 = the denoiser's own sample_size."""
        channels = self.latent_channels(self.denoiser_of(pipe).config)
        if resolution:
            scale = getattr(pipe, "vae_scale_factor", 8)
            check(resolution % scale == 0, f"resolution {resolution} must be a multiple of the VAE factor {scale}")
            return channels, resolution // scale, resolution // scale
        size = self.native_latent_size(pipe)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return channels, h, w

    def native_latent_size(self, pipe):
        """The latent side the denoiser was trained at (its config's sample_size)."""
        return self.denoiser_of(pipe).config.sample_size

    @staticmethod
    def latent_channels(config) -> int:
        """Channels of the VAE latents the denoiser takes."""
        return config.in_channels

    def use_sampler(self, pipe, name: str) -> None:
        """Swap the pipeline's scheduler for `name` (safeprune.sampling.SCHEDULERS) on the same noise schedule."""
        from safeprune.errors import choose
        from safeprune.sampling import samplers

        cls, extra = choose("sampler", name, samplers())
        if type(pipe.scheduler) is not cls:
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)

    def draw(self, pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float,
             size: dict) -> np.ndarray:
        """float images (B, H, W, 3) in [0, 1] from initial latents (B, C, h, w); classifier-free guidance
        against the empty prompt, deterministic (eta = 0)."""
        return pipe(prompt=prompts, negative_prompt=[""] * len(prompts), latents=latents, num_inference_steps=steps,
                    guidance_scale=guidance, eta=0.0, output_type="np", **size).images
