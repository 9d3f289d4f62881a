"""Anchor images for concept ablation (Kumari et al., ICCV 2023; seed paper eq. 5-6): x ~ p(x | anchor prompt).

Concept ablation regresses the student's prediction under the target prompt c onto the teacher's under the anchor
prompt c', at noised images x_t of the ANCHOR distribution (what the model should draw instead), not of the
concept. Sources:
  toy world  rendered: concept image i of the concept split, with each forbidden attribute replaced by an allowed
             value drawn from (seed, i), captioned with its anchor prompt. The anchor prompt names the other
             attributes only ("a red circle" for "striped style, a red circle"), and in the fine-tuning data such a
             style-free caption goes with any allowed style, so a uniformly drawn allowed value is that prompt's
             distribution. Image i stays aligned with concept image i, so both pair with the same concept.
  real scale a captioned image folder (`--anchor-data`), e.g. the teacher's samples of the anchor prompts
             (`safeprune concept-images --prompts ANCHOR`); an image whose caption is a concept's anchor pairs with
             that concept, the others are dealt round-robin (safeprune.unlearning.concepts.pair_images).
"""

from __future__ import annotations

import numpy as np

from safeprune.data.datasets import ToySplit
from safeprune.data.toyworld import Labels, draw
from safeprune.unlearning.concepts import anchor_from_labels
from safeprune.utils import numpy_rng


def anchor_labels(labels: Labels, forbidden: dict[str, tuple[str, ...]], allowed, rng: np.random.Generator) -> Labels:
    """`labels` with every forbidden attribute replaced by one of `allowed(kind)`, drawn with `rng`."""
    attrs = labels.as_dict()
    for kind in ("shape", "colour", "style"):
        if attrs[kind] in forbidden[kind]:
            choices = allowed(kind)
            attrs[kind] = choices[rng.integers(len(choices))]
    return Labels(**attrs)


class ToyAnchorImages(ToySplit):
    """The anchors of the first `n` concept-split images, index-aligned with them (see the module doc)."""

    def __init__(self, world, n: int, size: int):
        super().__init__(world, "concept", n, size)

    def record(self, i: int) -> dict:
        from PIL import Image

        _, _, concept = self.world.sample("concept", i)
        rng = numpy_rng(self.world.seed, "anchor", i)  # its own stream, pure in (seed, i)
        labels = anchor_labels(concept, self.world.forbidden, self.world.allowed, rng)
        image = draw(labels, rng, self.world.cfg.size)
        caption = anchor_from_labels(concept.as_dict(), self.world.forbidden)
        return {"image": Image.fromarray(image), "text": caption, "labels": labels.as_dict(), "key": str(i)}
