"""Whole-model concept erasure: the paper's two-stage baselines (seed paper Sec. 5, Tab. 1 rows "+ ESD",
"+ UCE", "+ ConceptPrune") and the upper-level losses run on their own.

Why a package beside `safeprune.unlearning`: an unlearning LOSS is one term of the bilevel upper level,
evaluated per step inside the fine-tuning loop; an ERASURE METHOD takes a whole model (pruned or not) and
returns it edited — in closed form (UCE), by masking weights (ConceptPrune) or with its own training loop
and score source (ESD as published). `safeprune unlearn` and `finetune --method two_stage --unlearn NAME`
call the same objects.

Each method is a small frozen dataclass built by `from_config(cfg)` from its own `unlearn` sub-section (the
registry entry is that classmethod, so nothing here knows a method's settings) and called as
`method(denoiser, ctx) -> report`: it edits the denoiser (a UNet, or an SD3 / Flux transformer) in place (the
model as loaded is the frozen starting model where one is needed: it is copied first) and returns
JSON-serialisable figures for summary.json. Every family of safeprune.backbones: `ctx.backbone` encodes the
prompts, calls the denoiser, samples (safeprune.erasure.sampling) and names the edit sets; see each method's
module for what it edits per family.

  esd_paper     ESD (Gandikota et al., ICCV 2023) as its authors ran it: self-sampled x_t, frozen start model
  uce           Unified Concept Editing (Gandikota et al., WACV 2024): closed-form to_k / to_v edit
  conceptprune  ConceptPrune (Chavhan et al., 2024): zero FFN weights skilled for the concept (masks persist)
  esd, esd_xattn, esd_anchor, ablation
                the upper-level losses of safeprune.unlearning on noised concept images, alone
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from safeprune.config import Concept, Config
from safeprune.erasure.conceptprune import ConceptPrune
from safeprune.erasure.esd_paper import ESDPaper
from safeprune.erasure.uce import UCE
from safeprune.erasure.upper_loss import UpperLoss
from safeprune.errors import check, choose
from safeprune.unlearning import UNLEARNING


@dataclass(eq=False)
class ErasureContext:
    """What a method may read besides the denoiser: the pipeline's text side and sampler, the concepts, the world."""

    pipe: object  # the family's diffusers pipeline around the denoiser being edited (text encoders, scheduler, vae)
    concepts: list[Concept]  # what to erase: target prompts and their anchors ("" = the empty prompt)
    world: object  # safeprune.data.toyworld.ToyWorld (forbidden words for derived preserve prompts, toy images)
    cfg: Config  # the resolved run config
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    concept_data: str | None = None  # concept image source of the loss-based methods (None = toy concept split)
    derived: bool = False  # the concepts were derived from toy concept captions (loss-based methods re-derive them
    # from their own concept images, so each image is noised under the caption that describes it)
    progress: bool = True  # tqdm bars for the training-based methods

    @property
    def backbone(self):
        """The pipeline's family (safeprune.backbones): text encoding, denoiser call, sampler, edit sets."""
        from safeprune.sampling import backbone_of_pipe

        return backbone_of_pipe(self.pipe)

    @torch.no_grad()
    def embed(self, prompts: list[str]):
        """The prompts' conditioning, float32 on `device`, as the pipeline conditions the denoiser: (P, L, D) hidden
        states for SD 1.x/2.x, a PromptEmbeddings of P rows (pooled text, time ids) for the other families."""
        return self.backbone.encode(self.pipe, prompts, self.device, self.cfg.sample.resolution)

    def last_word_index(self, prompts: list[str]) -> list[int]:
        """Index of each prompt's last word token (before EOS) in the text sequence; 0 for ''."""
        return self.backbone.last_word_index(self.pipe, prompts)


class ErasureMethod(Protocol):
    def __call__(self, denoiser: torch.nn.Module, ctx: ErasureContext) -> dict: ...


def swapped_prompts(prompt: str, forbidden: dict[str, tuple[str, ...]], allowed: Callable[[str], tuple]) -> list[str]:
    """`prompt` with each forbidden word it names replaced by every allowed value of that kind (whole words):
    'a striped red circle' -> ['a plain red circle', 'a outline red circle', ...]."""
    out = []
    for kind, names in forbidden.items():
        for name in names:
            if re.search(rf"\b{re.escape(name)}\b", prompt):
                out += [re.sub(rf"\b{re.escape(name)}\b", value, prompt) for value in allowed(kind)]
    return out


# The whole-model methods: not per-step losses, so `finetune --method two_stage --unlearn NAME` distils, then
# calls them. Each method's from_config reads its own `unlearn` sub-section.
WHOLE_MODEL: dict[str, Callable[[Config], ErasureMethod]] = {
    "uce": UCE.from_config,
    "conceptprune": ConceptPrune.from_config,
    "esd_paper": ESDPaper.from_config,
}
# Then every upper-level loss of safeprune.unlearning, run alone (settings: unlearn.loss).
ERASURE: dict[str, Callable[[Config], ErasureMethod]] = {
    **WHOLE_MODEL, **{name: functools.partial(UpperLoss.from_config, name) for name in UNLEARNING}}
# The names `finetune --unlearn` accepts: the per-step losses, and with two_stage the whole-model methods.
FINETUNE_UNLEARN = (*UNLEARNING, *WHOLE_MODEL)


def build_erasure(cfg: Config, name: str | None = None) -> ErasureMethod:
    """The registered erasure method `name` (default unlearn.method), configured from cfg.unlearn."""
    return choose("erasure method", name or cfg.unlearn.method, ERASURE)(cfg)


def check_concepts(concepts: list[Concept]) -> None:
    check(bool(concepts), "no concepts to erase; pass --forget PROMPT (repeatable, \"TARGET=>ANCHOR\" sets an "
                          "anchor) or set unlearn.concepts")
