"""`depth`: block removal on diffusion transformers (Flux / SD3 / PixArt) and SDXL-style UNets.

Tiny random-weight models built from config; the skip-error criterion must pick a block that computes the
identity, the pruned model must be a stock diffusers architecture (reload with the stock class, same outputs),
and the shipped full-size configs must give the public sizes on the meta device.
"""

import json

import pytest
import torch
from pruning_helpers import meta_unet

from safeprune.config import DepthOptions, PruneConfig
from safeprune.errors import UserError
from safeprune.pruning import METHODS, apply_plan, prune
from safeprune.pruning.depth import stacks
from safeprune.pruning.measure import count_parameters, meta_model, model_inputs, run_model
from safeprune.recipes.prune import ASSETS, SHIPPED_CONFIGS
from safeprune.utils import torch_rng

TINY = {
    "FluxTransformer2DModel": {"patch_size": 1, "in_channels": 4, "num_layers": 3, "num_single_layers": 4,
                               "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
                               "pooled_projection_dim": 8, "axes_dims_rope": [2, 2, 4], "guidance_embeds": True},
    "SD3Transformer2DModel": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 4,
                              "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
                              "caption_projection_dim": 16, "pooled_projection_dim": 8, "out_channels": 4,
                              "pos_embed_max_size": 8},
    "PixArtTransformer2DModel": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 8,
                                 "num_layers": 4, "attention_head_dim": 8, "num_attention_heads": 2,
                                 "cross_attention_dim": 16, "caption_channels": 16},
    # SDXL's layout (no attention in the outer stage, text_time added embeddings, deeper inner attentions)
    "UNet2DConditionModel": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                             "block_out_channels": [8, 16, 16], "attention_head_dim": [2, 2, 4],
                             "transformer_layers_per_block": [1, 2, 3], "cross_attention_dim": 16,
                             "norm_num_groups": 4, "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
                             "projection_class_embeddings_input_dim": 32, "use_linear_projection": True},
}
# a block of each family that is neither SD3's fixed last block nor one of the UNet's tied stacks
ZEROED = {"FluxTransformer2DModel": "single_transformer_blocks.2", "SD3Transformer2DModel": "transformer_blocks.1",
          "PixArtTransformer2DModel": "transformer_blocks.2",
          "UNet2DConditionModel": "up_blocks.0.attentions.1.transformer_blocks.1"}
FAMILIES = sorted(TINY)


def inputs(model, seed: int):
    return model_inputs(model, 2, 6, None if model.config.get("sample_size") else 4, torch_rng(seed, "depth-test"))


@torch.no_grad()
def output(model, x):
    return run_model(model, x)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {c.__name__: c for c in (FluxTransformer2DModel, SD3Transformer2DModel, PixArtTransformer2DModel,
                                   UNet2DConditionModel)}[family]
    torch.manual_seed(0)
    return cls(**TINY[family]).eval()  # real init: position tables and buffers as diffusers computes them


def test_skip_error_removes_the_block_that_computes_the_identity_first(family, model):
    base = _zeroed(model, ZEROED[family])
    x = inputs(base, 3)
    student, plan = prune(base, "depth", PruneConfig(ratio=1e-6, depth=DepthOptions(calibration_size=4)))
    assert plan["removed"] == [ZEROED[family]] and plan["select"] == "skip_error"
    assert plan["skip_errors"][ZEROED[family]] == pytest.approx(0.0, abs=1e-10)
    assert min(v for k, v in plan["skip_errors"].items() if k != ZEROED[family]) > 1e-6  # the others do matter
    # the block was an identity, so the shallower stock model computes what the full one did
    assert count_parameters(student) < count_parameters(base)
    torch.testing.assert_close(output(student, x), output(base, x), atol=1e-5, rtol=1e-5)


def _zeroed(model, name):
    import copy

    base = copy.deepcopy(model)
    with torch.no_grad():  # a residual block with every weight zero adds nothing (gates and projections are 0)
        for p in base.get_submodule(name).parameters():
            p.zero_()
    return base


def test_pruned_model_reloads_with_the_stock_class(family, model, tmp_path):
    removed = {"FluxTransformer2DModel": ["transformer_blocks.0", "single_transformer_blocks.1",
                                          "single_transformer_blocks.3"],
               "SD3Transformer2DModel": ["transformer_blocks.0", "transformer_blocks.2"],
               "PixArtTransformer2DModel": ["transformer_blocks.1"],
               "UNet2DConditionModel": ["down_blocks.1.attentions.1.transformer_blocks.0",
                                        "up_blocks.0.attentions.0.transformer_blocks.2"]}[family]
    student, plan = prune(model, "depth", PruneConfig(depth=DepthOptions(blocks=removed)))
    assert plan["removed"] == removed and plan.get("model_class", "UNet2DConditionModel") == family
    student.save_pretrained(tmp_path / "m", safe_serialization=True)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["_class_name"] == family  # the stock class, not a safeprune one
    loaded = type(model).from_pretrained(tmp_path / "m").eval()  # stock diffusers
    assert sum(stacks(loaded).values()) == sum(stacks(model).values()) - len(removed)
    x = inputs(model, 4)
    assert torch.equal(output(loaded, x), output(student.eval(), x))
    # the kept blocks are the teacher's, in order: the first kept block of the first stack is its old block 1
    first = next(iter(stacks(model)))
    if f"{first}.0" in removed:
        assert torch.equal(next(loaded.get_submodule(f"{first}.0").parameters()),
                           next(model.get_submodule(f"{first}.1").parameters()))
    # and the plan replays: the same architecture and weights from the base model
    replayed = apply_plan(model, plan)
    assert torch.equal(output(replayed.eval(), x), output(loaded, x))


def test_magnitude_applies_unchanged_to_transformers(family, model, tmp_path):
    if family == "UNet2DConditionModel":
        pytest.skip("UNets are covered by the contract tests")
    student, plan = prune(model, "magnitude", PruneConfig(ratio=0.3))
    total = count_parameters(model)
    zeros = sum(int((p == 0).sum()) for p in student.parameters()) - sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros >= 0.3 * total - 1 and plan["model_class"] == family
    student.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m").eval()
    x = inputs(model, 5)
    assert torch.equal(output(loaded, x), output(student.eval(), x))
    assert not torch.equal(output(loaded, x), output(model, x))


def test_presets_pick_counts_and_last_selection(model, family):
    if family == "UNet2DConditionModel":
        student, plan = prune(model, "depth", PruneConfig(depth=DepthOptions(preset="ssd-1b", select="last")))
        # SSD-1B's pattern on the tiny layout: the innermost stage's attentions (3 layers) keep at most 4: nothing
        assert plan["removed"] == []
        return
    student, plan = prune(model, "depth", PruneConfig(depth=DepthOptions(preset="half", select="last")))
    sizes = stacks(model)
    for stack, n in sizes.items():
        gone = [b for b in plan["removed"] if b.rpartition(".")[0] == stack]
        assert len(gone) == n - -(-n // 2)
    if family == "SD3Transformer2DModel":
        assert "transformer_blocks.3" not in plan["removed"]  # SD3's last block always stays
        assert plan["removed"] == ["transformer_blocks.1", "transformer_blocks.2"]
    with pytest.raises(UserError, match="flux-lite"):
        prune(model, "depth", PruneConfig(depth=DepthOptions(preset="flux-lite" if family != "FluxTransformer2DModel"
                                                             else "ssd-1b")))


def test_bad_depth_requests_are_one_line_errors(model, family):
    with pytest.raises(UserError, match="not a block of this model"):
        prune(model, "depth", PruneConfig(depth=DepthOptions(blocks=["transformer_blocks.99"])))
    with pytest.raises(UserError, match="out of reach"):
        prune(model, "depth", PruneConfig(ratio=0.99, depth=DepthOptions(select="last")))
    if family == "SD3Transformer2DModel":
        with pytest.raises(UserError, match="last block"):
            prune(model, "depth", PruneConfig(depth=DepthOptions(blocks=["transformer_blocks.3"])))
    if family == "UNet2DConditionModel":  # diffusers ties the mid block's depth to the innermost down attention's
        with pytest.raises(UserError, match="transformer_layers_per_block"):
            prune(model, "depth", PruneConfig(depth=DepthOptions(blocks=["mid_block.attentions.0.transformer_blocks.0"])))
    with pytest.raises(UserError, match="either"):
        METHODS["depth"].check_config(PruneConfig(depth=DepthOptions(blocks=["x.0"], preset="half")))


# ----------------------------------------------------------------------------- full-size, meta device

# Public sizes (parameters of the denoiser alone), given to two significant figures by their authors: SDXL's
# UNet "2.6B" (Podell et al. 2023), SD3-medium "2B" (Stability AI), Flux.1-dev "12B" (Black Forest Labs);
# pruned: Flux.1 Lite "8B" (Freepik), SSD-1B "1.3B" (Segmind). Two significant figures round to within
# 2.5 % of the exact count for these values (half a unit in the last place: 0.05 / 2.0), so that is the
# tolerance; the exact counts are pinned too, so a diffusers change shows up.
FULL = {"sdxl": (2.6e9, 2_567_463_684), "sd3_medium": (2.0e9, 2_028_328_000), "flux1_dev": (12e9, 11_901_408_320),
        "pixart_alpha_1024": (0.61e9, 611_349_152)}  # PixArt-alpha XL-2-1024-MS: "0.6B" (the paper), 611 M


@pytest.fixture(scope="module")
def full_size():
    return {name: meta_model(json.loads((ASSETS / SHIPPED_CONFIGS[name]).read_text())) for name in FULL}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_configs_give_the_public_parameter_counts(name, full_size):
    public, exact = FULL[name]
    n = count_parameters(full_size[name])
    assert n == pytest.approx(public, rel=0.025) and n == exact


@pytest.mark.parametrize("name,preset,public", [("flux1_dev", "flux-lite", 8e9), ("sdxl", "ssd-1b", 1.3e9)])
def test_depth_presets_reach_flux_lite_and_ssd_1b_sizes(name, preset, public, full_size):
    student, plan = prune(full_size[name], "depth", PruneConfig(depth=DepthOptions(preset=preset)))
    assert next(student.parameters()).is_meta and plan["select"] == "last"
    # within 2.5 % (two significant figures) of the released model's size: Flux.1 Lite 8 B, SSD-1B 1.3 B
    assert count_parameters(student) == pytest.approx(public, rel=0.025)
    if name == "flux1_dev":
        assert plan["config"]["num_layers"] == 8 and plan["config"]["num_single_layers"] == 38


def test_cli_plans_flux_depth_on_meta_and_reports_params_and_macs(capsys, tmp_path):
    from safeprune.cli import main

    code = main(["prune", "--transformer-config", "flux1_dev", "--method", "depth", "prune.depth.preset=flux-lite",
                 "--out", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "d" / "prune_report.json").read_text())
    assert report["params_before"] == FULL["flux1_dev"][1] and report["weights"] is False
    assert report["params_after"] == pytest.approx(8.16e9, rel=0.01) and len(report["removed"]) == 11
    # one call at 1024 px (64x64 tokens + 512 text tokens); the double-stream blocks carry ~19 % of the MACs
    assert report["macs_before"] > 3e13 and 0.75 < report["macs_ratio"] < 0.85 and report["latent_size"] == 128
    plan = json.loads((tmp_path / "d" / "plan.json").read_text())
    assert plan["model_class"] == "FluxTransformer2DModel" and plan["config"]["num_layers"] == 8


def test_cli_plans_pixart_depth_on_meta(capsys, tmp_path):
    """TinyFusion's 2x cut on PixArt-alpha 1024: 28 -> 14 blocks, half the MACs (its position table, a buffer
    outside the state dict, stays on the meta device with the rest)."""
    from safeprune.cli import main

    code = main(["prune", "--transformer-config", "pixart_alpha_1024", "--method", "depth", "prune.depth.preset=half",
                 "--out", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "d" / "prune_report.json").read_text())
    assert report["params_before"] == FULL["pixart_alpha_1024"][1] and len(report["removed"]) == 14
    assert report["params_after"] == pytest.approx(0.314e9, rel=0.01) and report["macs_ratio"] == pytest.approx(0.5, abs=0.01)


def test_cli_refuses_an_unknown_denoiser_class(capsys, tmp_path):
    from safeprune.cli import main

    (tmp_path / "c.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    assert main(["prune", "--unet-config", str(tmp_path / "c.json"), "--out", str(tmp_path / "d")]) == 2
    assert "supported denoiser" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_sdxl_meta_plan_keeps_a_stock_unet_config():
    sdxl = meta_unet(json.loads((ASSETS / SHIPPED_CONFIGS["sdxl"]).read_text()))
    _, plan = prune(sdxl, "depth", PruneConfig(depth=DepthOptions(preset="ssd-1b")))
    config = plan["config"]
    assert config["transformer_layers_per_block"] == [1, [2, 2], [4, 4]]
    assert config["reverse_transformer_layers_per_block"] == [[4, 4, 4], [2, 2, 2], [1, 1, 1]]
    assert len(plan["removed"]) == 36  # 6 of 20 down, 6 of 10 mid, 24 of 30 up (innermost stage)
    rebuilt = meta_unet(config)  # stock diffusers builds it
    assert len(rebuilt.mid_block.attentions[0].transformer_blocks) == 4


@pytest.mark.parametrize("family", ["PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"])
def test_channels_prunes_transformer_heads_and_ffn_units_through_torch_pruning(family, tmp_path):
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, family)(**TINY[family]).eval()
    student, plan = prune(model, "channels", PruneConfig(ratio=0.1))
    assert count_parameters(student) <= 0.9 * count_parameters(model)
    kinds = {g["kind"] for g in plan["groups"]}
    assert "ffn" in kinds and (("heads" in kinds) == (family == "PixArtTransformer2DModel"))  # joint attention: no
    for g in plan["groups"]:
        if g["kind"] == "heads":  # whole heads go: head_dim stays 8
            attn = student.get_submodule(g["block"])
            assert attn.to_q.out_features == 8 * attn.heads < 8 * model.get_submodule(g["block"]).heads
    x = inputs(model, 6)
    assert output(student, x).shape == output(model, x).shape
    assert torch.equal(output(apply_plan(model, plan).eval(), x), output(student.eval(), x))  # the plan replays
    # the saved form: safeprune's subclass with the widths in its config, loading without a replay, also once
    # diffusers re-saved it (no plan.json)
    from safeprune.models.io import load_unet, save_unet

    save_unet(student, tmp_path / "m", plan)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["_class_name"] == f"Pruned{family}" and set(config["pruned_widths"]) == kinds
    loaded = load_unet(tmp_path / "m")
    assert torch.equal(output(loaded, x), output(student, x))
    loaded.save_pretrained(tmp_path / "resaved")
    assert torch.equal(output(load_unet(tmp_path / "resaved"), x), output(student, x))


def test_cli_depth_on_the_toy_teacher_measures_skip_errors_on_its_training_data(capsys, tmp_path, toy_teacher_dir):
    """With weights, the skip error runs on calibration batches of real data (VAE-encoded images, encoded
    captions: safeprune.recipes.prune.taylor_calibration with output='prediction'), and the student is a stock UNet."""
    from diffusers import UNet2DConditionModel

    from safeprune.cli import main

    code = main(["prune", "--model", str(toy_teacher_dir), "--method", "depth", "--ratio", "0.02",
                 "prune.depth.calibration_batch_size=2", "prune.latency_runs=1", "--out", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "s" / "prune_report.json").read_text())
    plan = json.loads((tmp_path / "s" / "model" / "unet" / "plan.json").read_text())
    assert report["select"] == "skip_error" and report["removed"] and report["removed_share"] >= 0.02
    assert set(report["removed"]) <= set(plan["skip_errors"])
    kept_errors = [v for k, v in plan["skip_errors"].items() if k not in report["removed"]]
    assert max(plan["skip_errors"][b] for b in report["removed"]) <= max(kept_errors)  # the cheapest went
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "s" / "model" / "unet")  # stock diffusers
    assert sum(p.numel() for p in unet.parameters()) == report["params_after"]
