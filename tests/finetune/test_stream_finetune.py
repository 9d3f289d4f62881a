"""Stream mode end to end: webdataset shards -> workers -> VAE per step -> a few fine-tuning steps, exact
resume, the text-embedding cache, and replayed draws for the penalty solver."""

import json

import pytest
import torch

import safeprune.checkpoint
from safeprune.backbones import BACKBONES
from safeprune.data.toyworld import ToyWorld
from safeprune.models.io import load_unet

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three webdataset shards of 4 toy images each (PNG + caption)."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("wds")
    world = ToyWorld()
    images = world.export(folder / "images", "finetune", 12)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    for s in range(3):
        with wds.TarWriter(str(folder / f"train-{s}.tar")) as sink:
            for row in rows[4 * s:4 * s + 4]:
                sink.write({"__key__": row["file_name"].split(".")[0], "png": (images / row["file_name"]).read_bytes(),
                            "txt": row["text"].encode()})
    return f"{folder}/train-{{0..2}}.tar"


@pytest.fixture(scope="module")
def pipe(toy_teacher):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(toy_teacher, safety_checker=None, requires_safety_checker=False)


def _rows(out):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_streamed_finetune_from_shards(finetune_cli, shards, tmp_path):
    cache = tmp_path / "text_cache"
    code, err = finetune_cli(tmp_path / "run", "--data", shards, "--max-steps", "3", "finetune.data.num_workers=1",
                             f"finetune.data.text_cache={cache}")
    assert code == 0, err
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and "upper/cu" in rows[1]
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["data"] == {"consumed": 6}  # 3 steps x batch 2, drawn from the stream
    assert len(list(cache.glob("*/*/*.safetensors"))) >= 2  # one entry per distinct caption seen


def test_streamed_run_resumes_exactly(finetune_cli, shards, tmp_path, monkeypatch):
    run = ["--data", shards, "--max-steps", "4", "--method", "distill", "finetune.ckpt_every_steps=2",
           "finetune.data.num_workers=0"]
    assert finetune_cli(tmp_path / "straight", *run)[0] == 0
    real_save = safeprune.checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(safeprune.checkpoint, "save_checkpoint", save_then_die)
    out = tmp_path / "resumed"
    assert finetune_cli(out, *run)[0] == 130
    monkeypatch.setattr(safeprune.checkpoint, "save_checkpoint", real_save)
    code, err = finetune_cli(out, *run, "--resume")
    assert code == 0, err
    straight, resumed = load_unet(tmp_path / "straight").state_dict(), load_unet(out).state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _rows(out) == _rows(tmp_path / "straight")


def test_stream_mode_on_the_toy_split_and_bad_shards(finetune_cli, tmp_path):
    code, err = finetune_cli(tmp_path / "toy", "--max-steps", "2", "--method", "distill", "finetune.data.mode=stream",
                             "finetune.data.num_workers=0")
    assert code == 0, err
    (tmp_path / "bad.tar").write_bytes(b"\0" * 100)
    code, err = finetune_cli(tmp_path / "bad", "--data", str(tmp_path / "bad.tar"), "--max-steps", "2")
    assert code == 2 and "not a tar file" in err and len(err.strip().splitlines()) == 1, err


def test_text_cache_matches_the_encoder_and_is_keyed_by_it(pipe, tmp_path):
    from safeprune.data.datasets import embed_prompts
    from safeprune.data.stream import TextEmbeddings, encoder_identity

    captions = ["a red circle", "a blue square", "a red circle"]
    first = TextEmbeddings(BACKBONES["sd"], pipe, device="cpu", folder=tmp_path)
    out = first(captions)
    assert torch.equal(out, embed_prompts(captions, pipe.tokenizer, pipe.text_encoder)) and first.encoded == 2
    again = TextEmbeddings(BACKBONES["sd"], pipe, device="cpu", folder=tmp_path)
    assert torch.equal(again(captions), out) and again.encoded == 0  # served from the safetensors files
    files = list(tmp_path.glob("*/*/*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))
    import copy

    other = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert encoder_identity(pipe.tokenizer, other) != encoder_identity(pipe.tokenizer, pipe.text_encoder)


def test_a_replayed_draw_returns_the_same_batch(pipe):
    from safeprune.bilevel.problem import step_generator
    from safeprune.data.datasets import ToySplit
    from safeprune.data.stream import ImageStream, StreamLatents, TextEmbeddings

    images = ImageStream(ToySplit(ToyWorld(), "finetune", 8, None), batch_size=2, resolution=32)
    pool = StreamLatents(images, pipe.vae, TextEmbeddings(BACKBONES["sd"], pipe, device="cpu"),
                         device="cpu")
    tokens, width = pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size
    table, rows = pool.attach(torch.zeros(3, tokens, width))  # 3 fixed prompts, then 2 rows for each draw
    assert rows.tolist() == [3, 4] and table.shape == (5, tokens, width)
    idx, z = pool.draw(step_generator(0, 0, 5, "outer"), 2)
    emb = table[rows[idx]].clone()
    _, fresh = pool.draw(step_generator(0, 0, 6, "outer"), 2)  # another step: new images
    _, replay = pool.draw(step_generator(0, 0, 5, "outer"), 2)  # lower_value's replay of step 5
    assert torch.equal(z, replay) and not torch.equal(z, fresh) and torch.equal(table[rows[idx]], emb)
    assert images.consumed == 4 and z.shape == (2, 4, 16, 16)
