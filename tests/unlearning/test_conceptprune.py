"""ConceptPrune: skilled-weight selection, and masks that survive save/load and fine-tuning like magnitude masks."""

import copy

import torch
from unlearning_helpers import FORGET, TINY, context

from safeprune.cli import main
from safeprune.erasure.conceptprune import ConceptPrune, ffn_output_layers, skilled_mask
from safeprune.models.io import load_plan, load_unet
from safeprune.pruning import sparsity_masks


def test_skilled_mask_is_the_row_top_k_that_beats_the_base():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 1.0]])
    target = torch.tensor([1.0, 1.0, 1.0, 8.0])
    base = torch.tensor([1.0, 0.5, 2.0, 1.0])
    mask = skilled_mask(weight, target, base, sparsity=0.5)  # top 2 of 4 per row
    # row 0 scores 1, 2, 3, 4 -> top {2, 3}; column 2 scores higher under the base (6 > 3): only column 3 is skilled
    # row 1 scores 4, 1, 1, 8 -> top {0, 3}; column 0 ties with the base (4 = 4): only column 3
    assert mask.tolist() == [[False, False, False, True], [False, False, False, True]]


def test_conceptprune_zeroes_only_ffn_output_weights(toy_pipe):
    unet = copy.deepcopy(toy_pipe.unet)
    ctx = context(toy_pipe, [("a striped red circle", "a red circle")])
    report = ConceptPrune(sparsity=0.1, timesteps=2, sample_steps=4, guidance=5.0)(unet, ctx)
    assert report["zeroed"] > 0 and report["masked_layers"] == sorted(n for n, _ in ffn_output_layers(unet))
    before, after = toy_pipe.unet.state_dict(), unet.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith("ff.net.2.weight") for k in changed)
    assert sum(int((after[k] == 0).sum()) - int((before[k] == 0).sum()) for k in changed) == report["zeroed"]


def test_masks_survive_save_load_and_a_finetuning_step(pipe_dir, students, tmp_path, capsys):
    erased = tmp_path / "erased"
    assert main(["unlearn", "--model", str(students["channels"]), "--method", "conceptprune", "--out", str(erased),
                 *FORGET, *TINY]) == 0, capsys.readouterr().err
    plan = load_plan(erased)
    assert plan["method"] == "channels" and plan["masked_layers"] and plan["erasure"][-1]["method"] == "conceptprune"
    masks = sparsity_masks(load_unet(erased))  # re-registered from the saved zeros
    assert set(masks) == {f"{n}.weight" for n in plan["masked_layers"]} and any((~m).any() for m in masks.values())
    tuned = tmp_path / "tuned"
    code = main(["finetune", "--student", str(erased), "--teacher", str(pipe_dir), "--method", "distill",
                 "--max-steps", "2", "--out", str(tuned), "finetune.batch_size=2", "finetune.data.pool=4",
                 "finetune.warmup_steps=0"])
    assert code == 0, capsys.readouterr().err
    weights, start = load_unet(tuned).state_dict(), load_unet(erased).state_dict()
    for name, mask in masks.items():
        assert torch.all(weights[name][~mask] == 0), name  # the erased weights stayed zero ...
    assert any(not torch.equal(weights[k], start[k]) for k in masks)  # ... while the rest trained
    assert load_plan(tuned)["masked_layers"] == plan["masked_layers"]
    assert set(sparsity_masks(load_unet(tuned))) == set(masks)
