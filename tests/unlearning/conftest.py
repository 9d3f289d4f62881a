"""Erasure fixtures: the random-weight toy pipeline and three pruned students of it (blocks, channels, magnitude)."""

import pytest
import torch
from unlearning_helpers import TINY

from safeprune.cli import main


@pytest.fixture(scope="session")
def pipe_dir(random_teacher_dir):
    return random_teacher_dir


@pytest.fixture(scope="session")
def students(pipe_dir, tmp_path_factory):
    """{"blocks" | "channels" | "magnitude": saved student folder} pruned from the random teacher's UNet."""
    from diffusers import UNet2DConditionModel

    from safeprune.config import BlocksOptions, PruneConfig
    from safeprune.models.io import save_unet
    from safeprune.pruning import prune

    root = tmp_path_factory.mktemp("students")
    out = {}
    for method, cfg in (("blocks", PruneConfig(blocks=BlocksOptions(preset="small"))),
                        ("channels", PruneConfig(ratio=0.3)), ("magnitude", PruneConfig(ratio=0.5))):
        torch.manual_seed(0)
        unet, plan = prune(UNet2DConditionModel.from_pretrained(pipe_dir / "unet"), method, cfg)
        out[method] = save_unet(unet, root / method, plan, base_model=pipe_dir)
    return out


@pytest.fixture
def unlearn_cli(capsys):
    """unlearn_cli(*argv) runs `safeprune unlearn` in-process -> (exit code, stderr)."""

    def run(*argv):
        code = main(["unlearn", *argv, *TINY])
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def toy_pipe(pipe_dir):
    from safeprune.models.io import load_pipeline

    return load_pipeline(pipe_dir)
