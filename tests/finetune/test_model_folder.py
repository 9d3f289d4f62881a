"""The run's model/ folder with stock diffusers: channels, blocks and magnitude students fine-tuned, then
`DiffusionPipeline.from_pretrained(run/model)` draws exactly what `safeprune generate` draws for the same seeds;
checkpoints are loadable by `generate`; --push-to-hub reaches the upload call (no network)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from safeprune.cli import main

STUDENTS = {"channels": {"ratio": 0.3}, "blocks": {"blocks.preset": "base"}, "magnitude": {"ratio": 0.3}}
PROMPTS = ["a red circle", "a striped blue square"]


@pytest.fixture(scope="module")
def pruned(toy_teacher, tmp_path_factory):
    """{method: prune output folder (model/ = a pipeline folder)} built with the `safeprune prune` CLI."""
    root = tmp_path_factory.mktemp("pruned")
    for method, options in STUDENTS.items():
        flags = [f"prune.{k}={v}" for k, v in options.items()]
        assert main(["prune", "--model", str(toy_teacher), "--method", method, "--out", str(root / method),
                     "prune.latency_runs=1", *flags]) == 0
    return root


def _generate(model, out, prompts_file, capsys):
    code = main(["generate", "--model", str(model), "--prompts", str(prompts_file), "--seeds", "2", "--steps", "3",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    return np.stack([np.asarray(Image.open(out / f"{k:05d}.png")) for k in range(len(PROMPTS) * 2)])


@torch.no_grad()
def _stock_images(folder) -> np.ndarray:
    """What a diffusers user writes: from_pretrained, one generator per image, DDIM eta 0, empty negative prompt."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.unet.config
    prompts = [p for p in PROMPTS for _ in (0, 1)]
    latents = torch.cat([torch.randn((1, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                     generator=torch.Generator().manual_seed(seed)) for _ in PROMPTS for seed in (0, 1)])
    images = pipe(prompt=prompts, negative_prompt=[""] * len(prompts), latents=latents, num_inference_steps=3,
                  guidance_scale=5.0, eta=0.0, output_type="np").images  # one batch, as `generate` draws them
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", list(STUDENTS))
def test_stock_pipeline_draws_what_generate_draws(finetune_cli, pruned, tmp_path, capsys, method):
    run = tmp_path / "run"
    code, err = finetune_cli(run, "--student", str(pruned / method), "--max-steps", "2", "--method", "distill",
                             "finetune.ckpt_every_steps=1", "finetune.keep_checkpoints=2")
    assert code == 0, err
    index = json.loads((run / "model" / "model_index.json").read_text())
    assert index["unet"][0] == ("safeprune" if method == "channels" else "diffusers")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    generated = _generate(run / "model", tmp_path / "gen", prompts, capsys)
    assert np.array_equal(_stock_images(run / "model"), generated)
    # the last checkpoint holds the same weights as the result: `generate` takes it and draws the same images
    assert np.array_equal(_generate(run / "checkpoints" / "step_0000002", tmp_path / "gen_ckpt", prompts, capsys),
                          generated)
    earlier = _generate(run / "checkpoints" / "step_0000001", tmp_path / "gen_ckpt1", prompts, capsys)
    assert earlier.shape == generated.shape and not np.array_equal(earlier, generated)


def test_push_to_hub_uploads_the_model_folder(finetune_cli, pruned, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw)) or "https://hub/commit/1")
    run = tmp_path / "run"
    code, err = finetune_cli(run, "--student", str(pruned / "channels"), "--max-steps", "1", "--method", "distill",
                             "--push-to-hub", "me/tiny-student")
    assert code == 0, err
    (create, repo, _), (upload, kwargs) = calls
    assert (create, repo, upload) == ("create", "me/tiny-student", "upload")
    assert kwargs["folder_path"] == str(run / "model") and kwargs["repo_id"] == "me/tiny-student"
    assert (run / "model" / "README.md").is_file()
