"""The erasure registry: the whole-model methods plus every upper-level loss, each built from its own settings."""

from safeprune.config import load_config
from safeprune.erasure import ERASURE, FINETUNE_UNLEARN, WHOLE_MODEL, build_erasure
from safeprune.unlearning import UNLEARNING


def test_every_method_reads_its_own_unlearn_section():
    assert list(ERASURE) == [*WHOLE_MODEL, *UNLEARNING] and set(FINETUNE_UNLEARN) == set(ERASURE)
    cfg = load_config(None, ["unlearn.uce.erase_scale=3.0", "unlearn.conceptprune.sparsity=0.05",
                             "unlearn.esd_paper.lr=1e-3", "unlearn.loss.eta=1.5"])
    assert build_erasure(cfg, "uce").erase_scale == 3.0 and build_erasure(cfg, "conceptprune").sparsity == 0.05
    assert build_erasure(cfg, "esd_paper").lr == 1e-3 and build_erasure(cfg, "esd_paper").eta == 1.0
    for name in UNLEARNING:  # the losses share unlearn.loss and keep their own name
        method = build_erasure(cfg, name)
        assert method.name == name and method.eta == 1.5
