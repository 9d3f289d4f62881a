"""Whole-model erasures (`safeprune unlearn`: esd_paper, uce, conceptprune, the upper losses) on the tiny SDXL,
SD3, Flux and PixArt pipelines: each runs through the CLI, does what its method claims in the family's own terms, and the
saved folder loads with the family's stock diffusers pipeline."""

import json

import pytest
import torch

from safeprune.backbones import BACKBONES, is_cross_attention
from safeprune.cli import main

TARGET, KEPT, ANCHOR = "a striped red circle", "a blue square", "a red circle"
TINY = ["sample.resolution=32", "unlearn.esd_paper.steps=4", "unlearn.esd_paper.lr=1e-4",
        "unlearn.esd_paper.sample_steps=4", "unlearn.conceptprune.sample_steps=4", "unlearn.conceptprune.timesteps=2",
        "unlearn.conceptprune.sparsity=0.1", "unlearn.uce.stream_steps=2", "unlearn.loss.steps=2",
        "unlearn.loss.batch_size=2", "unlearn.loss.concept_pool=4"]
# UCE without derived preserve prompts: on random weights they are near-copies of the target, and the test
# wants the edit itself to show
UCE_ALONE = ["unlearn.uce.preserve_derived=false"]


def _erase(teacher, method, tmp_path, capsys, *flags):
    out = tmp_path / method
    code = main(["unlearn", "--model", str(teacher), "--method", method, "--forget", f"{TARGET}=>{ANCHOR}",
                 "--out", str(out), *TINY, *flags])
    assert code == 0, capsys.readouterr().err
    return out


def _stock(folder, family):
    import diffusers

    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # as diffusers documents
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **no_t5)
    assert type(pipe).__name__ == BACKBONES[family].pipeline_class
    return pipe


@torch.no_grad()
def _predictions(backbone, pipe, denoiser, prompts):
    """The denoiser's predictions (P, C, h, w) under `prompts`, all at one x_t and t (the erasure's resolution)."""
    emb = backbone.encode(pipe, prompts, "cpu", 32)
    c, h, w = backbone.latent_shape(pipe, 32)
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).repeat(len(prompts), 1, 1, 1)
    t = torch.full((len(prompts),), 500, dtype=torch.long if backbone.denoiser == "unet" else torch.float32)
    return backbone.predict(denoiser, x, t, emb)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_esd_paper_regresses_onto_negative_guidance_in_the_family_space(family, request, tmp_path, capsys):
    """ESD-x moves only the attention that reads the text, toward eq. 5's target in the family's prediction space
    (velocity for SD3 / Flux) at a fixed x_t."""
    from safeprune.models.io import load_pipeline

    teacher, _ = request.getfixturevalue(f"{family}_family")
    out = _erase(teacher, "esd_paper", tmp_path, capsys)
    backbone, start = BACKBONES[family], load_pipeline(teacher)
    erased = _stock(out, family)
    before, after = backbone.denoiser_of(start), backbone.denoiser_of(erased)
    moved = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert moved and all(is_cross_attention(n) for n in moved)
    old = _predictions(backbone, start, before, [TARGET, ""])
    new = _predictions(backbone, start, after, [TARGET])
    target = old[1] - 1.0 * (old[0] - old[1])  # eta = 1 against the empty prompt
    assert (new[0] - target).norm() < (old[0] - target).norm()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["student_bwd"] == 4 and summary["loss_first"] > 0


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_uce_maps_the_target_onto_the_anchor_through_the_text_projections(family, request, tmp_path, capsys):
    """Only the text keys/values change; the erased model's prediction under the target moves toward the start
    model's under the anchor, and (MMDiT) the first joint block's value projection maps the target's text-stream
    input at one timestep closer to the anchor's value than before (eq. 7 was solved on inputs averaged over
    sampling steps, and at width 16 the dozens of tail tokens cannot all be mapped exactly)."""
    from safeprune.models.io import load_pipeline

    teacher, _ = request.getfixturevalue(f"{family}_family")
    out = _erase(teacher, "uce", tmp_path, capsys, *UCE_ALONE)
    backbone, start = BACKBONES[family], load_pipeline(teacher)
    erased = _stock(out, family)
    before, after = backbone.denoiser_of(start), backbone.denoiser_of(erased)
    moved = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    # SDXL and PixArt: attn2, reading the prompt embeddings (PixArt: their caption projection); MMDiT: the text stream
    ends = ("to_k.weight", "to_v.weight") if family in ("sdxl", "pixart") else ("add_k_proj.weight", "add_v_proj.weight")
    assert moved and all(is_cross_attention(n) and n.endswith(ends) for n in moved)
    old = _predictions(backbone, start, before, [TARGET, ANCHOR])
    new = _predictions(backbone, start, after, [TARGET])
    assert (new[0] - old[1]).norm() < (old[0] - old[1]).norm()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_residual_after"] < summary["target_residual_before"]
    if family in ("sdxl", "pixart"):
        return
    name = "transformer_blocks.0.attn.add_v_proj"
    seen = []
    hook = before.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        _predictions(backbone, start, before, [TARGET, ANCHOR])
    finally:
        hook.remove()
    t_tok, a_tok = backbone.last_word_index(start, [TARGET, ANCHOR])
    c_t, c_a = seen[0][0, t_tok], seen[0][1, a_tok]  # the last word's text-stream input at block 0
    w_old, w_new = before.get_submodule(name), after.get_submodule(name)
    with torch.no_grad():
        assert (w_new(c_t) - w_old(c_a)).norm() < 0.75 * (w_old(c_t) - w_old(c_a)).norm()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_conceptprune_masks_the_image_ffns_and_the_masks_load_back(family, request, tmp_path, capsys):
    """Zeros only in the FFN layers that read image tokens (never `ff_context`; Flux single blocks: only the MLP
    columns of proj_out), kept as masks by load_unet, and the stock pipeline loads the zeros."""
    from safeprune.erasure.conceptprune import ffn_output_layers, neuron_start
    from safeprune.models.io import load_pipeline, load_plan, load_unet

    teacher, _ = request.getfixturevalue(f"{family}_family")
    out = _erase(teacher, "conceptprune", tmp_path, capsys)
    backbone = BACKBONES[family]
    before, after = backbone.denoiser_of(load_pipeline(teacher)), backbone.denoiser_of(_stock(out, family))
    layers = dict(ffn_output_layers(before))
    changed = {n.removesuffix(".weight") for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))}
    assert changed and changed <= set(layers) and not any("ff_context" in n for n in changed)
    summary = json.loads((out / "summary.json").read_text())
    zeros = sum(int((after.get_parameter(f"{n}.weight") == 0).sum() - (layers[n].weight == 0).sum()) for n in changed)
    assert zeros == summary["zeroed"] > 0 and sorted(layers) == load_plan(out)["masked_layers"]
    if family == "flux":  # the single blocks' attention-output columns stay; their MLP columns lose weights
        singles = [n for n in layers if n.startswith("single_transformer_blocks.")]
        assert singles and any(n in changed for n in singles)
        for n in singles:
            start = neuron_start(before, n, layers[n])
            assert 0 < start and torch.equal(after.get_parameter(f"{n}.weight")[:, :start], layers[n].weight[:, :start])
    reloaded = load_unet(out)
    assert all(hasattr(reloaded.get_submodule(n), "safeprune_mask") for n in layers)


@pytest.mark.parametrize("family, method", [("sdxl", "esd"), ("sd3", "ablation"), ("flux", "esd_xattn"), ("pixart", "esd")])
def test_the_upper_losses_run_alone_on_the_families(family, method, request, tmp_path, capsys):
    teacher, _ = request.getfixturevalue(f"{family}_family")
    out = _erase(teacher, method, tmp_path, capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2 and summary["cu_first"] > 0
    _stock(out, family)


def test_two_stage_erases_a_distilled_transformer_student_in_place(sd3_family, tmp_path, capsys):
    """finetune --method two_stage --unlearn uce: the run's transformer/ is what gets edited and stays loadable."""
    from safeprune.models.io import load_unet

    teacher, student = sd3_family
    out = tmp_path / "run"
    code = main(["finetune", "--student", str(student), "--teacher", str(teacher), "--out", str(out),
                 "--method", "two_stage", "--unlearn", "uce", "--forget", f"{TARGET}=>{ANCHOR}",
                 "finetune.max_steps=2", "finetune.upper.every=1", "finetune.batch_size=2", "finetune.data.pool=4", "finetune.warmup_steps=0",
                 "finetune.ckpt_every_steps=100", "finetune.validation_every_steps=0", "finetune.resolution=32",
                 *TINY, *UCE_ALONE])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "two_stage"
    erased, start = load_unet(out), load_unet(student)
    moved = [n for n, p in erased.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert any(n.endswith("add_v_proj.weight") for n in moved)
    _stock(out / "model", "sd3")


def test_esd_parameter_sets_follow_the_family():
    """ESD-x = the text keys/values (MMDiT add_k/v_proj), ESD-u = the rest without the family's output head and
    time embedding (UNet conv_out / time_embedding; transformer proj_out / norm_out / time_text_embed)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from safeprune.erasure.esd_paper import trainable

    with init_empty_weights():
        model = SD3Transformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    names = {id(p): n for n, p in model.named_parameters()}
    xattn = {names[id(p)] for p in trainable(model, "xattn", BACKBONES["sd3"])}
    noxattn = {names[id(p)] for p in trainable(model, "noxattn", BACKBONES["sd3"])}
    assert xattn and all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in xattn)
    assert not xattn & noxattn and not any(n.startswith(("proj_out.", "norm_out.", "time_text_embed.")) for n in noxattn)
    assert xattn | noxattn | {n for n in names.values() if n.startswith(("proj_out.", "norm_out.", "time_text_embed."))} \
        == set(names.values())
