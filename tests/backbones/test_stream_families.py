"""Stream mode (safeprune.data.stream) beyond SD 1.x/2.x: the captions of each draw are conditioned by the family's
own `backbone.encode` (every PromptEmbeddings field lands in the table rows the stream reserved), the text cache
keeps every field in safetensors under an identity of ALL the pipeline's text encoders, and `finetune` runs
end to end with finetune.data.mode=stream on SDXL and Flux."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from safeprune.backbones import BACKBONES
from safeprune.bilevel.problem import step_generator
from safeprune.cli import main
from safeprune.data.datasets import ToySplit
from safeprune.data.stream import ImageStream, StreamLatents, TextEmbeddings, text_identity
from safeprune.data.toyworld import ToyWorld

FIELDS = ("hidden", "pooled", "time_ids", "mask")


def _pipe(request, family):
    teacher, _ = request.getfixturevalue(f"{family}_family")
    return BACKBONES[family].load_pipeline(teacher, {})


def _same(a, b):
    """Every PromptEmbeddings field equal (None where the other is None)."""
    return all((getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f))
               for f in FIELDS)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_a_draw_writes_the_family_encoding_of_its_captions_into_every_field(family, request):
    backbone, pipe = BACKBONES[family], _pipe(request, family)
    images = ImageStream(ToySplit(ToyWorld(), "finetune", 8, 32), batch_size=2, resolution=32)
    seen, take = [], images.take

    def take_and_remember(n):  # the captions this draw used
        pixels, captions = take(n)
        seen.extend(captions)
        return pixels, captions

    images.take = take_and_remember
    pool = StreamLatents(images, pipe.vae, TextEmbeddings(backbone, pipe, device="cpu", resolution=32),
                         device="cpu", latent_shape=backbone.latent_shape(pipe, 32))
    fixed = backbone.encode(pipe, ["", "a red circle"], "cpu", 32)
    table, rows = pool.attach(fixed)
    assert rows.tolist() == [2, 3] and len(table) == 4 and _same(table[:2], fixed)
    idx, z = pool.draw(step_generator(0, 0, 1, "lower"), 2)
    assert z.shape == (2, *pool.latent_shape) and len(seen) == 2
    drawn = table[rows[idx]]
    assert _same(drawn, backbone.encode(pipe, seen, "cpu", 32))  # all fields, bit for bit
    assert _same(table[:2], fixed)  # the fixed prompts' rows are untouched


@pytest.mark.parametrize("family", ["sdxl", "flux", "pixart"])
def test_the_text_cache_keeps_every_field_and_serves_a_second_run(family, request, tmp_path):
    backbone, pipe = BACKBONES[family], _pipe(request, family)
    captions = ["a red circle", "a blue square", "a red circle"]
    first = TextEmbeddings(backbone, pipe, device="cpu", folder=tmp_path, resolution=32)
    out = first(captions)
    assert first.encoded == 2 and _same(out, backbone.encode(pipe, captions, "cpu", 32))
    files = sorted(tmp_path.glob("*/*/*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))
    stored = load_file(str(files[0]))  # plain safetensors, one tensor per field the family has
    assert set(stored) == {f for f in FIELDS if getattr(out, f) is not None}
    again = TextEmbeddings(backbone, pipe, device="cpu", folder=tmp_path, resolution=32)
    assert _same(again(captions), out) and again.encoded == 0  # dtypes too: PixArt's mask stays long


def test_the_cache_identity_covers_the_family_every_encoder_and_the_resolution(request, random_teacher_dir):
    from diffusers import StableDiffusionPipeline

    sdxl, flux = _pipe(request, "sdxl"), _pipe(request, "flux")
    sd = StableDiffusionPipeline.from_pretrained(random_teacher_dir, safety_checker=None, requires_safety_checker=False)
    key = text_identity(BACKBONES["sdxl"], sdxl, 32)
    assert len({key, text_identity(BACKBONES["flux"], flux, 32), text_identity(BACKBONES["sd"], sd, 32)}) == 3
    assert text_identity(BACKBONES["sdxl"], sdxl, 64) != key  # SDXL's time ids depend on the size
    other = copy.deepcopy(sdxl)
    with torch.no_grad():  # only the SECOND text encoder differs
        next(other.text_encoder_2.parameters()).add_(1.0)
    assert text_identity(BACKBONES["sdxl"], other, 32) != key


STREAM_FLAGS = ["finetune.max_steps=2", "finetune.upper.every=2", "finetune.batch_size=2",
                "finetune.upper.batch_size=2", "finetune.data.pool=8", "finetune.data.concept_pool=4",
                "finetune.warmup_steps=0", "finetune.ckpt_every_steps=100", "finetune.resolution=32",
                "finetune.data.mode=stream", "finetune.data.num_workers=0"]


@pytest.mark.parametrize("family, flags", [
    ("sdxl", ["--method", "bilevel", "--unlearn", "esd_xattn"]),
    ("flux", ["--method", "distill"]),
])
def test_finetune_streams_on_the_families(family, flags, request, tmp_path, capsys):
    teacher, student = request.getfixturevalue(f"{family}_family")
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = main(["finetune", "--student", str(student), "--teacher", str(teacher), "--out", str(out), *STREAM_FLAGS,
                 f"finetune.data.text_cache={cache}", *flags])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_mode"] == "stream" and summary["method"] == flags[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["lower/ft"] > 0 for r in rows)
    assert ("upper/cu" in rows[1]) == ("--unlearn" in flags)
    state = json.loads(next((out / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["data"] == {"consumed": 4}  # 2 steps x batch 2, drawn from the stream
    assert list(cache.glob("*/*/*.safetensors"))  # the streamed captions' embeddings, cached
