"""Which prompts the upper level suppresses, and which concept image goes with which prompt.

A concept is {target, anchor}: the prompt to suppress and (for `ablation`) the prompt it should map to.
Sources, first that applies: `--forget "PROMPT"` / `--forget "TARGET=>ANCHOR"` on the CLI, then the config's
`finetune.concepts`, else concepts derived from the concept images themselves (the toy default):

  derived: every concept image's own caption is a target (toy `concept` captions always name the forbidden
  concept, in the four training templates, e.g. "striped style, a red circle"), and its anchor is the
  same object without the forbidden words in the canonical order "a {style} {colour} {shape}"
  ("a red circle"). So ESD sees every phrasing the finetune data could use, and each concept image is
  noised under exactly the prompt that describes it.

Pairing of explicit concepts with concept images: an image whose caption equals a target is paired with
it (the `safeprune concept-images` workflow writes each prompt as the caption); the others are dealt
round-robin over the concepts in image order.
"""

from __future__ import annotations

from safeprune.config import Concept
from safeprune.errors import check

SEPARATOR = "=>"


def parse_forget(texts: list[str]) -> list[Concept]:
    """CLI `--forget` values -> concepts; "TARGET=>ANCHOR" sets an anchor, plain text has none."""
    concepts = []
    for text in texts:
        target, _, anchor = text.partition(SEPARATOR)
        check(bool(target.strip()), f'--forget {text!r} has an empty target; write --forget "PROMPT" or '
                                    f'--forget "TARGET{SEPARATOR}ANCHOR"')
        concepts.append(Concept(target=target.strip(), anchor=anchor.strip()))
    return concepts


def anchor_from_labels(labels: dict, forbidden: dict[str, tuple[str, ...]]) -> str:
    """'a {style} {colour} {shape}' without the forbidden words; '' (the empty prompt) if nothing is left."""
    words = [labels[kind] for kind in ("style", "colour", "shape")
             if labels.get(kind) and labels[kind] not in forbidden.get(kind, ())]
    return f"a {' '.join(words)}" if words else ""


def derive_concepts(captions: list[str], labels: list[dict], forbidden: dict[str, tuple[str, ...]]) \
        -> tuple[list[Concept], list[int]]:
    """Concepts from captioned, labelled concept images (see the module doc) and each image's concept index."""
    index: dict[tuple[str, str], int] = {}
    concepts, pairing = [], []
    for caption, lab in zip(captions, labels):
        key = (caption, anchor_from_labels(lab, forbidden))
        if key not in index:
            index[key] = len(concepts)
            concepts.append(Concept(target=key[0], anchor=key[1]))
        pairing.append(index[key])
    return concepts, pairing


def pair_images(concepts: list[Concept], captions: list[str], by: str = "target") -> list[int]:
    """Concept index per image: exact caption match (with each concept's `by` prompt: target, or anchor for
    anchor images) first, the rest round-robin (see the module doc)."""
    check(bool(concepts), "no concepts to suppress; set finetune.concepts or pass --forget PROMPT")
    by_target = {getattr(c, by): i for i, c in enumerate(concepts)}
    pairing, dealt = [], 0
    for caption in captions:
        if caption in by_target:
            pairing.append(by_target[caption])
        else:
            pairing.append(dealt % len(concepts))
            dealt += 1
    return pairing
