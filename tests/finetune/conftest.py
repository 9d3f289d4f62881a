"""Fine-tuning fixtures: a random-weight toy teacher pipeline and a `channels`-pruned student, saved once."""

import pytest
import torch

from safeprune.cli import main

# Small enough for seconds per run on 2 CPU cores; every code path (lower, upper, checkpoints) still runs.
FAST = ["finetune.batch_size=2", "finetune.upper.batch_size=2", "finetune.data.pool=12", "finetune.data.concept_pool=6",
        "finetune.warmup_steps=0", "finetune.upper.every=2", "finetune.ckpt_every_steps=100"]


@pytest.fixture(scope="session")
def fast_flags():
    return list(FAST)


@pytest.fixture(scope="session")
def toy_teacher(random_teacher_dir):
    """A stock diffusers StableDiffusionPipeline folder with the toy architecture (random weights)."""
    return random_teacher_dir


@pytest.fixture(scope="session")
def student_dir(toy_teacher, tmp_path_factory):
    """The teacher's UNet, `channels`-pruned (ratio 0.3), in the saved form of `safeprune prune`."""
    from diffusers import UNet2DConditionModel

    from safeprune.config import PruneConfig
    from safeprune.models.io import save_unet
    from safeprune.pruning import prune

    torch.manual_seed(0)
    unet, plan = prune(UNet2DConditionModel.from_pretrained(toy_teacher / "unet"), "channels", PruneConfig(ratio=0.3))
    return save_unet(unet, tmp_path_factory.mktemp("student") / "channels", plan, base_model=toy_teacher)


@pytest.fixture(scope="session")
def magnitude_student(toy_teacher, tmp_path_factory):
    """The teacher's UNet, `magnitude`-pruned to 50 % sparsity (masks that fine-tuning must keep)."""
    from diffusers import UNet2DConditionModel

    from safeprune.config import PruneConfig
    from safeprune.models.io import save_unet
    from safeprune.pruning import prune

    unet, plan = prune(UNet2DConditionModel.from_pretrained(toy_teacher / "unet"), "magnitude", PruneConfig(ratio=0.5))
    return save_unet(unet, tmp_path_factory.mktemp("student") / "magnitude", plan, base_model=toy_teacher)


@pytest.fixture
def finetune_cli(capsys, toy_teacher, student_dir):
    """finetune_cli(out, *flags) runs `safeprune finetune` in-process -> (exit code, stderr)."""

    def run(out, *extra, student=student_dir):
        argv = ["finetune", "--out", str(out), *FAST, *extra]
        argv += [] if "--student" in extra else ["--student", str(student)]
        argv += [] if "--teacher" in extra else ["--teacher", str(toy_teacher)]
        code = main(argv)
        return code, capsys.readouterr().err

    return run
