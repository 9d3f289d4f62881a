"""`none`: the identity, for the control run that fine-tunes the teacher's own (unpruned) architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safeprune.pruning.base import Method


@dataclass(frozen=True)
class Identity(Method):
    prunes: ClassVar[bool] = False

    def __call__(self, unet, cfg, calib):
        return unet, {}

    def replay(self, unet, plan):
        return unet
