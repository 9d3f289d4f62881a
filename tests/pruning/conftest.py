"""Fixtures for the pruning tests: tiny SD-architecture UNets from config and the toy teacher."""

from pathlib import Path

import pytest
import torch
from pruning_helpers import TINY_SD


@pytest.fixture(scope="session")
def tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_SD).eval()


@pytest.fixture(scope="session")
def toy_teacher_dir(random_teacher_dir) -> Path:
    """The shipped toy teacher when it exists, else a random-weight pipeline of the same architecture."""
    from safeprune.models.shipped import ASSETS as SHIPPED

    if (SHIPPED / "teacher" / "model_index.json").is_file():
        return SHIPPED / "teacher"
    return random_teacher_dir


@pytest.fixture(scope="session")
def toy_unet(toy_teacher_dir):
    from safeprune.models.io import load_unet

    return load_unet(toy_teacher_dir)
