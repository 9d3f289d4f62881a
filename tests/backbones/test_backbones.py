"""Backbone families: detection, SD 1.x/2.x unchanged, the flow-matching target and ESD in velocity space, and
SDXL / SD3 / Flux / PixArt tiny pipelines through `finetune --method bilevel` and their own diffusers pipelines."""

import copy
import json

import pytest
import torch

from safeprune.backbones import BACKBONES, backbone_for_config, backbone_of, is_cross_attention
from safeprune.backbones.base import FlowMatchSchedule
from safeprune.cli import main
from safeprune.errors import UserError
from safeprune.unlearning import build_unlearning


def test_families_are_read_from_model_index_and_denoiser_configs(random_teacher_dir, tmp_path):
    assert backbone_of(random_teacher_dir).name == "sd"
    assert backbone_of(random_teacher_dir / "unet").name == "sd"
    assert backbone_for_config({"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}).name == "sdxl"
    assert backbone_for_config({"_class_name": "SD3Transformer2DModel"}).name == "sd3"
    assert backbone_for_config({"_class_name": "FluxTransformer2DModel"}).name == "flux"
    assert backbone_for_config({"_class_name": "PixArtTransformer2DModel"}).name == "pixart"
    for name, family in [("PixArtSigmaPipeline", "pixart"), ("PixArtAlphaPipeline", "pixart"), ("KandinskyPipeline", None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": name}))
        if family:
            assert backbone_of(tmp_path / name).name == family
            continue
        with pytest.raises(UserError, match=f"is a {name}, which safeprune does not support") as err:
            backbone_of(tmp_path / name)
        assert "\n" not in str(err.value) and "StableDiffusion3Pipeline (sd3)" in str(err.value)


def test_an_unsupported_family_is_one_line_from_the_cli(tmp_path, capsys):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    code = main(["generate", "--model", str(tmp_path / "k"), "--prompts", "toy:forget", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "KandinskyPipeline" in err and "PixArtAlphaPipeline (pixart)" in err
    assert not (tmp_path / "g").exists()


def test_cross_attention_is_named_per_family():
    assert is_cross_attention("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert not is_cross_attention("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight")
    assert is_cross_attention("transformer_blocks.0.attn.add_v_proj.weight")  # MMDiT: the text stream's values
    assert not is_cross_attention("transformer_blocks.0.attn.to_v.weight")  # the image stream's own
    assert is_cross_attention("transformer_blocks.2.attn2.to_k.weight")  # PixArt: cross-attention to T5
    assert not is_cross_attention("transformer_blocks.2.attn1.to_k.weight")


def test_the_sd_backbone_gives_todays_loss_on_a_fixed_batch(random_teacher_dir):
    """DiffusionProblem through the SD backbone == the pre-backbone code (written out here), bit for bit."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import compute_snr

    from safeprune.bilevel.problem import DiffusionProblem, Pools, step_generator
    from safeprune.data.datasets import LatentPool
    from safeprune.losses import DenoisingLoss, FeatureKD, LowerLevelLoss, min_snr_weight, mse_per_sample
    from safeprune.models import toy
    from safeprune.models.hooks import capture_features, match_blocks

    teacher = UNet2DConditionModel.from_pretrained(random_teacher_dir / "unet").eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(0)
    pool = LatentPool(torch.randn(8, 4, 16, 16, generator=g), 0.1 * torch.rand(8, 4, 16, 16, generator=g), ["c"] * 8, [{}] * 8)
    pools = Pools(lower=pool, lower_prompt=torch.arange(8) % 3, embeddings=torch.randn(5, 6, 64, generator=g), null_prompt=0,
                  concept=pool, concept_target=torch.full((8,), 3), concept_anchor=torch.full((8,), 4))
    sched = toy.build_schedulers("v_prediction")[0]
    pairs = tuple(match_blocks(teacher, student))
    problem = DiffusionProblem(student=student, student_core=student, teacher=teacher, scheduler=sched,
                               lower_loss=LowerLevelLoss(DenoisingLoss(sched, 5.0), FeatureKD(pairs)), pools=pools,
                               unlearning=build_unlearning("esd"), batch_size=3, upper_batch_size=3, seed=0)
    assert problem.backbone is BACKBONES["sd"]

    # the code before backbones, verbatim in substance
    gen = step_generator(0, 0, 7, "lower")
    idx, latents = pool.draw(gen, 3)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(1000, (3,), generator=gen)
    x_t = sched.add_noise(latents, noise, t)
    emb = pools.embeddings[pools.lower_prompt[idx]]
    with torch.no_grad():
        with capture_features(teacher, [p[0] for p in pairs]) as tf:
            t_out = teacher(x_t, t, encoder_hidden_states=emb).sample.float()
        with capture_features(student, [p[1] for p in pairs]) as sf:
            s_out = student(x_t, t, encoder_hidden_states=emb).sample
    diff = mse_per_sample(s_out, sched.get_velocity(latents, noise, t)) * min_snr_weight(compute_snr(sched, t), 5.0,
                                                                                          "v_prediction")
    feat = torch.stack([mse_per_sample(sf[b], tf[a]) for a, b in pairs]).mean(0)
    expected = (diff + 2.0 * mse_per_sample(s_out, t_out) + 0.1 * feat).mean().item()
    assert problem.lower_value(7) == expected

    gen = step_generator(0, 0, 7, "upper")
    idx, latents = pool.draw(gen, 3)
    noise_u = torch.randn(latents.shape, generator=gen)
    t = torch.randint(1000, (3,), generator=gen)
    x_t = sched.add_noise(latents, noise_u, t)
    with torch.no_grad():
        both = teacher(x_t.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=pools.embeddings[
            torch.cat([pools.concept_target[idx], torch.zeros(3, dtype=torch.long)])]).sample.float()
        cond, ref = both.chunk(2)
        s_eps = student(x_t, t, encoder_hidden_states=pools.embeddings[pools.concept_target[idx]]).sample
        eta = problem.unlearning.eta
        expected_cu = mse_per_sample(s_eps, ref - eta * (cond - ref)).mean().item()
        assert problem._upper_terms(step_generator(0, 0, 7, "upper")).mean().item() == expected_cu


def test_flow_matching_noises_and_targets_as_diffusers_trainers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0 = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    noise, t, x_t = schedule.noised(x0, torch.Generator().manual_seed(2), "cpu")
    s = schedule.sigma_of(t, x0)
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise)  # x_t = (1 - sigma) x0 + sigma noise
    assert torch.allclose(s.flatten(), t / 1000)  # SD3: the transformer's timestep is 1000 sigma
    assert torch.equal(schedule.target(x0, noise, t), noise - x0)
    assert 0.2 < s.mean() < 0.8 and s.std() > 0.1  # logit-normal around sigma = 0.5 (shifted), not one value


def test_flow_matching_esd_target_equals_the_eps_space_one_mapped_to_velocity():
    """ESD's guided target, built from the teacher's velocities, is the eps-space target mapped to velocity at the
    same (x_t, t): v = eps - x0(eps) with x0 = (x_t - sigma eps) / (1 - sigma)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    _, t, x_t = schedule.noised(x0, g, "cpu")
    eps = {c: torch.randn(4, 4, 8, 8, generator=g) for c in ("target", "null", "anchor")}  # teacher noise estimates
    velocity = {c: schedule.prediction_from_eps(e, x_t, t) for c, e in eps.items()}
    s = schedule.sigma_of(t, x_t)
    assert torch.allclose(velocity["null"], eps["null"] - (x_t - s * eps["null"]) / (1 - s))
    for name in ("esd", "esd_anchor", "ablation"):
        loss = build_unlearning(name)
        in_eps = schedule.prediction_from_eps(loss.target({c: eps[c] for c in loss.teacher_conditions}), x_t, t)
        in_velocity = loss.target({c: velocity[c] for c in loss.teacher_conditions})
        assert torch.allclose(in_velocity, in_eps, atol=1e-4), name
    # the map is affine, not linear: a target whose weights did not sum to 1 would not carry over
    assert not torch.allclose(schedule.prediction_from_eps(2 * eps["null"], x_t, t), 2 * velocity["null"], atol=1e-3)


FAMILY_FLAGS = ["finetune.max_steps=4", "finetune.method=bilevel", "finetune.upper.every=2", "finetune.batch_size=2",
                "finetune.upper.batch_size=2", "finetune.data.pool=8", "finetune.data.concept_pool=4",
                "finetune.warmup_steps=0", "finetune.ckpt_every_steps=100", "finetune.validation_every_steps=4",
                "finetune.validation_seeds=1", "finetune.validation_prompts=[a red circle]",
                "sample.steps=2", "sample.batch_size=2", "finetune.resolution=32", "sample.resolution=32"]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_bilevel_end_to_end_and_sampling_through_the_family_pipeline(family, request, tmp_path, capsys):
    import diffusers

    from safeprune.models.io import load_pipeline, load_unet
    from safeprune.recipes.generate import generate_images

    teacher, student = request.getfixturevalue(f"{family}_family")
    out = tmp_path / "run"
    code = main(["finetune", "--student", str(student), "--teacher", str(teacher), "--out", str(out), "--unlearn",
                 "esd_xattn", *FAMILY_FLAGS])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upper_steps"] == 2 and summary["feature_blocks"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["lower/ft"] > 0 for r in rows) and "upper/cu" in rows[1]
    assert (out / "validation" / "step_0000004.png").is_file()

    backbone = BACKBONES[family]
    trained, start = load_unet(out), load_unet(student)
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))}
    assert moved and any(is_cross_attention(n) for n in moved)
    masked = [m for m in trained.modules() if hasattr(m, "safeprune_mask")]  # magnitude masks survive training
    assert masked and all(torch.all(m.weight[~m.safeprune_mask] == 0) for m in masked)

    pipe = load_pipeline(out)  # the run's model/ folder, through the family's stock pipeline class
    assert type(pipe).__name__ == backbone.pipeline_class
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # as diffusers documents
    assert type(diffusers.DiffusionPipeline.from_pretrained(out / "model", **no_t5)).__name__ == backbone.pipeline_class
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [0, 1, 2]
    draw = dict(steps=2, guidance=3.0, progress=False, resolution=32)
    images = generate_images(pipe, prompts, seeds, batch_size=3, **draw)
    alone = generate_images(pipe, prompts[2:], seeds[2:], batch_size=1, **draw)
    assert images.shape == (3, 32, 32, 3) and images.dtype.name == "uint8" and images.std() > 0
    assert abs(images[2].astype(int) - alone[0].astype(int)).max() <= 1  # image i depends on (prompt_i, seed_i) only
    assert not (images[0] == images[2]).all()  # another seed, another image


@pytest.mark.parametrize("family, flags", [
    ("sd3", ["--method", "two_stage", "--unlearn", "ablation"]),  # distil, then the anchor-image upper loss
    ("flux", ["--method", "bilevel", "--unlearn", "esd_anchor", "finetune.solver.name=penalty"]),
    ("sdxl", ["--method", "distill"]),
    ("pixart", ["--method", "two_stage", "--unlearn", "esd"]),
    ("pixart", ["--method", "bilevel", "--unlearn", "ablation", "finetune.solver.name=penalty"]),
    # on-policy x_t on the flow-matching Euler sampler (and Flux's one-call guidance)
    ("sd3", ["--method", "bilevel", "--unlearn", "esd_anchor", "finetune.upper.sample_steps=3", "finetune.upper.images=student"]),
    ("flux", ["--method", "bilevel", "--unlearn", "esd_anchor", "finetune.upper.sample_steps=3", "finetune.upper.images=student"]),
])
def test_every_method_runs_on_the_families(family, flags, request, tmp_path, capsys):
    teacher, student = request.getfixturevalue(f"{family}_family")
    out = tmp_path / "run"
    argv = ["finetune", "--student", str(student), "--teacher", str(teacher), "--out", str(out), *FAMILY_FLAGS[:9],
            "finetune.resolution=32", *flags]
    code = main([a for a in argv if a != "finetune.method=bilevel"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    uses_upper = "--unlearn" in flags
    assert summary["method"] == flags[1] and (summary["upper_steps"] > 0) == uses_upper
    assert any("upper/cu" in r for r in rows) == uses_upper and all(r.get("lower/ft", 1) > 0 for r in rows)
    if "penalty" in flags[-1]:
        assert summary["solver"] == "penalty" and any("outer/gap" in r for r in rows)
    if "images=student" in flags[-1]:  # k ~ U{0..2} sampler steps per upper draw; at least one draw samples
        assert summary["counts"].get("student_sample_fwd", 0) > 0


@pytest.mark.parametrize("family", ["sd3", "pixart"])  # Flux samples through the same code (its draw: the e2e test); ~60 s here
def test_the_toy_evaluation_runs_through_the_family_pipeline(family, request):
    import math

    from safeprune.config import load_config
    from safeprune.data.toyworld import ToyWorld
    from safeprune.eval.metrics import evaluate_model
    from safeprune.models.io import load_pipeline

    teacher, student = request.getfixturevalue(f"{family}_family")
    cfg = load_config(None, ["eval.seeds_per_prompt=1", "eval.max_prompts=2", "eval.heldout=false",
                             "eval.affinity_images=4", "sample.steps=2", "sample.resolution=32"])
    pipe, reference = load_pipeline(student.parent), load_pipeline(teacher)
    res = evaluate_model(pipe, ToyWorld(cfg.toyworld, seed=0), cfg, reference_pipe=reference)
    assert res["eval_images"] == 6  # 2 forget + 2 retain prompts, and the reference's 2 forget images (cp)
    assert 0 <= res["valid"] <= 1 and math.isfinite(res["fd"]) and res["fd"] > 0
    assert math.isfinite(res["concept_affinity"]) and res["concept_affinity"] != res["reference_concept_affinity"]


def test_transformer_blocks_pair_by_relative_depth():
    from safeprune.backbones.sd3 import depth_pairs

    assert depth_pairs(3, 3, "b") == [("b.0", "b.0"), ("b.1", "b.1"), ("b.2", "b.2")]  # unpruned: every block
    assert depth_pairs(24, 12, "b")[-1] == ("b.23", "b.11")  # the last student block matches the teacher's output
    assert [t for t, _ in depth_pairs(28, 14, "b")] == [f"b.{2 * i + 1}" for i in range(14)]  # TinyFusion 28 -> 14


def test_sd3_without_t5_pads_as_many_zero_tokens_as_clip_tokens(sd3_family):
    """No T5: the zero block stands in for it at the CLIP length, in training (encode) and sampling alike."""
    from safeprune.backbones import get_backbone
    from safeprune.models.io import load_pipeline

    pipe = load_pipeline(sd3_family[0])
    backbone, length = get_backbone("sd3"), pipe.tokenizer.model_max_length
    assert backbone.sequence_length(pipe) == length < backbone.max_sequence_length
    emb = backbone.encode(pipe, ["a red circle", "a blue square"], "cpu")
    assert emb.hidden.shape[1] == 2 * length
    assert emb.hidden[:, length:].abs().sum() == 0 and emb.hidden[:, :length].abs().sum() > 0


def test_one_family_detection_serves_measuring_and_training():
    """measure's class and text-token defaults come from safeprune.backbones: the same answer for every denoiser."""
    from accelerate import init_empty_weights
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from safeprune.backbones import denoiser_class_of, family_key, known_denoisers
    from safeprune.models.pruned_unet import PrunedUNet2DConditionModel
    from safeprune.pruning.measure import default_text_tokens, family_of

    unet = dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    sdxl = dict(unet, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32)
    assert known_denoisers() == ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
                                 "PixArtTransformer2DModel")
    with init_empty_weights():
        models = {"sdxl": UNet2DConditionModel(**sdxl),
                  "sd3": SD3Transformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                               joint_attention_dim=16, caption_projection_dim=16,
                                               pooled_projection_dim=16, pos_embed_max_size=16),
                  "pixart": PixArtTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                     in_channels=4, cross_attention_dim=16, caption_channels=16,
                                                     sample_size=8, norm_type="ada_norm_single"),
                  "sd": UNet2DConditionModel(**unet)}
    for key, model in models.items():
        assert family_key(model) == key and family_of(model) == denoiser_class_of(model) == type(model).__name__
        if key in BACKBONES:
            assert backbone_for_config({"_class_name": family_of(model), **model.config}).name == key
    assert [default_text_tokens(models[k]) for k in ("sd", "sdxl", "sd3", "pixart")] == [77, 77, 333, 120]
    assert denoiser_class_of(PrunedUNet2DConditionModel.__new__(PrunedUNet2DConditionModel)) == "UNet2DConditionModel"
    assert family_key(torch.nn.Linear(1, 1)) is None


def test_transformer_blocks_pair_with_the_teacher_blocks_a_depth_plan_kept():
    from safeprune.backbones.sd3 import depth_pairs

    assert depth_pairs(4, 2, "b", [0, 3]) == [("b.0", "b.0"), ("b.3", "b.1")]  # the plan's record wins
    assert depth_pairs(4, 2, "b", [0, 1, 3]) == depth_pairs(4, 2, "b")  # a record of another student: relative depth
    assert depth_pairs(4, 2, "b", [0, 5]) == [("b.1", "b.0"), ("b.3", "b.1")]  # ... or of another teacher


def test_a_depth_pruned_sd3_student_distils_each_block_from_its_own_original(sd3_family, tmp_path, capsys):
    """Depth-prune the tiny SD3 (3 joint blocks) without block 1: student blocks 0, 1 ARE teacher blocks 0, 2, and
    feature KD pairs exactly those (relative depth would pair student 0 with teacher 1)."""
    from diffusers import SD3Transformer2DModel

    from safeprune.backbones.sd3 import depth_pairs
    from safeprune.config import DepthOptions, PruneConfig
    from safeprune.models.io import load_plan, load_unet, save_model
    from safeprune.pruning import prune
    from safeprune.pruning.depth import kept_blocks

    teacher, _ = sd3_family
    student, plan = prune(SD3Transformer2DModel.from_pretrained(teacher / "transformer"), "depth",
                          PruneConfig(depth=DepthOptions(blocks=["transformer_blocks.1"])))
    folder = save_model(student, tmp_path / "student" / "model", plan, teacher)
    assert kept_blocks(load_plan(folder), load_unet(folder)) == {"transformer_blocks": [0, 2]}
    expected = [["transformer_blocks.0", "transformer_blocks.0"], ["transformer_blocks.2", "transformer_blocks.1"]]
    assert [list(p) for p in depth_pairs(3, 2, "transformer_blocks")] != expected
    out = tmp_path / "run"
    code = main(["finetune", "--student", str(folder), "--teacher", str(teacher), "--out", str(out),
                 "--method", "distill", *(f for f in FAMILY_FLAGS[:9] if f != "finetune.method=bilevel"),
                 "finetune.resolution=32"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "distill" and summary["feature_blocks"] == expected


def test_pixart_masks_the_padding_and_drops_the_learned_sigma(pixart_family):
    """The T5 mask reaches the transformer (padding states cannot change the prediction; without the mask they
    do), and the prediction is the eps half of the 8-channel learned-sigma output."""
    from safeprune.backbones.base import PromptEmbeddings
    from safeprune.models.io import load_pipeline

    teacher, _ = pixart_family
    pipe, backbone = load_pipeline(teacher), BACKBONES["pixart"]
    emb = backbone.encode(pipe, ["", "a red circle"], "cpu")
    assert emb.mask.dtype == torch.long and emb.mask.shape == emb.hidden.shape[:2] and emb.time_ids is None
    n = int(emb.mask[1].sum())
    assert 1 < n < emb.mask.shape[1] and emb.mask[1, :n].all()  # the prompt's tokens, then padding
    assert emb[1:].mask.shape == (1, emb.mask.shape[1]) and emb.to(torch.bfloat16).mask.dtype == torch.long
    model = pipe.transformer.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300])
    with torch.no_grad():
        out = backbone.predict(model, x, t, emb[1:])
        raw = model(x, timestep=t, encoder_hidden_states=emb.hidden[1:], encoder_attention_mask=emb.mask[1:],
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert raw.shape[1] == 8 and out.shape == x.shape and torch.equal(out, raw[:, :4])
        noisy = emb.hidden[1:].clone()
        noisy[:, n:] += torch.randn(noisy[:, n:].shape, generator=g)  # change only the padding states
        masked = backbone.predict(model, x, t, PromptEmbeddings(noisy, mask=emb.mask[1:]))
        unmasked = backbone.predict(model, x, t, PromptEmbeddings(noisy))
    torch.testing.assert_close(masked, out, atol=1e-6, rtol=0)
    assert (unmasked - out).abs().max() > 1e-4


def test_pixart_alpha_1024_conditions_on_the_image_size_and_sigma_loads_as_sigma(tmp_path, pixart_builder):
    """sample_size 128 (the 1024 px PixArt-alpha) adds (height, width) and aspect ratio, as diffusers' pipeline
    does; a PixArtSigmaPipeline folder loads, assembles and draws as a PixArtSigmaPipeline."""
    from diffusers import PixArtTransformer2DModel

    from safeprune.models.io import load_pipeline
    from safeprune.recipes.generate import generate_images

    TINY_PIXART, build_pixart = pixart_builder
    backbone = BACKBONES["pixart"]
    pipe = build_pixart(tmp_path, "PixArtSigmaPipeline")
    pipe.save_pretrained(tmp_path / "sigma")
    loaded = load_pipeline(tmp_path / "sigma")
    assert type(loaded).__name__ == "PixArtSigmaPipeline"
    assert type(backbone.assemble(loaded, loaded.transformer)).__name__ == "PixArtSigmaPipeline"
    images = generate_images(loaded, ["a red circle"], [0], steps=2, guidance=3.0, progress=False, resolution=32)
    assert images.shape == (1, 32, 32, 3) and images.std() > 0

    torch.manual_seed(0)
    # width 24: the size embeddings take a third of the width each (PixArt-alpha's 1152 = 3 x 384)
    big = PixArtTransformer2DModel(**{**TINY_PIXART, "sample_size": 128, "num_attention_heads": 3,
                                      "cross_attention_dim": 24}).eval()
    assert big.use_additional_conditions
    emb = backbone.encode(backbone.assemble(pipe, big), ["a red circle", "a blue square"], "cpu", resolution=1024)
    assert emb.time_ids.tolist() == [[1024.0, 1024.0, 1.0]] * 2
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])

    def call(side):
        added = {"resolution": torch.full((2, 2), side), "aspect_ratio": torch.ones(2, 1)}
        return big(x, timestep=t, encoder_hidden_states=emb.hidden, encoder_attention_mask=emb.mask,
                   added_cond_kwargs=added).sample[:, :4]

    with torch.no_grad():
        out = backbone.predict(big, x, t, emb)
        assert torch.equal(out, call(1024.0)) and not torch.allclose(out, call(512.0))


@pytest.mark.parametrize("method", ["depth", "channels"])
def test_a_pruned_pixart_distils_and_loads_with_diffusers(method, pixart_family, tmp_path, capsys):
    """depth (TinyFusion's half) leaves a stock PixArtTransformer2DModel; channels (heads and feed-forward units)
    safeprune's PrunedPixArtTransformer2DModel, which DiffusionPipeline.from_pretrained loads by name."""
    import diffusers

    from safeprune.config import DepthOptions, PruneConfig
    from safeprune.models.io import load_pipeline, save_model
    from safeprune.pruning import prune

    teacher, _ = pixart_family
    transformer = load_pipeline(teacher).transformer
    cfg = PruneConfig(depth=DepthOptions(preset="half")) if method == "depth" else PruneConfig(ratio=0.1)
    student, plan = prune(transformer, method, cfg)
    folder = save_model(student, tmp_path / "student" / "model", plan, teacher)
    out = tmp_path / "run"
    code = main(["finetune", "--student", str(folder), "--teacher", str(teacher), "--out", str(out), *FAMILY_FLAGS[:9],
                 "finetune.resolution=32", "--method", "distill"])
    assert code == 0, capsys.readouterr().err
    pairs = json.loads((out / "summary.json").read_text())["feature_blocks"]
    loaded = diffusers.DiffusionPipeline.from_pretrained(out / "model")
    assert type(loaded).__name__ == "PixArtAlphaPipeline"
    if method == "depth":
        assert plan["select"] == "skip_error" and len(plan["removed"]) == 2
        assert pairs == [["transformer_blocks.1", "transformer_blocks.0"], ["transformer_blocks.3", "transformer_blocks.1"]]
        stock = diffusers.PixArtAlphaPipeline.from_pretrained(out / "model")  # no safeprune class involved
        assert type(stock.transformer).__name__ == "PixArtTransformer2DModel" and stock.transformer.config.num_layers == 2
    else:
        heads = [g for g in plan["groups"] if g["kind"] == "heads"]
        assert heads and type(loaded.transformer).__name__ == "PrunedPixArtTransformer2DModel"
        assert loaded.transformer.get_submodule(heads[0]["block"]).heads < 2
        assert len(pairs) == 4  # the residual stream is kept: every block's output is compared
    images = loaded(prompt=["a red circle"], num_inference_steps=2, height=32, width=32, use_resolution_binning=False,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and images.std() > 0
