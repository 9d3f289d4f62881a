"""Helpers shared by the erasure tests (imported by name; fixtures live in conftest.py)."""

# Seconds per run: few sampling steps, two training steps, four concept images.
TINY = ["unlearn.conceptprune.sample_steps=4", "unlearn.conceptprune.timesteps=2", "unlearn.conceptprune.sparsity=0.1",
        "unlearn.esd_paper.steps=2", "unlearn.esd_paper.sample_steps=4", "unlearn.loss.steps=2",
        "unlearn.loss.batch_size=2", "unlearn.loss.concept_pool=4"]
FORGET = ["--forget", "a striped red circle=>a red circle", "--forget", "striped style, a blue square=>a blue square"]


def context(pipe, concepts, **cfg_overrides):
    """An ErasureContext for `pipe` with `concepts` [(target, anchor)] and `section.field=value` overrides."""
    from safeprune.config import Concept, load_config
    from safeprune.data.toyworld import ToyWorld
    from safeprune.erasure import ErasureContext

    cfg = load_config(None, [f"{k}={v}" for k, v in cfg_overrides.items()])
    return ErasureContext(pipe=pipe, concepts=[Concept(t, a) for t, a in concepts], world=ToyWorld(cfg.toyworld),
                          cfg=cfg, progress=False)
