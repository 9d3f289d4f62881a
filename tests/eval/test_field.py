"""The field metrics against their libraries' own code, the prompt providers on fixtures written here, resumable
generation, and every protocol end to end on a tiny random pipeline with tiny random CLIP / Inception / CSD."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from safeprune.cli import main
from safeprune.config import CONFIG_DIR, load_config
from safeprune.errors import UserError
from safeprune.eval.features import cmmd, frechet_distance, mmd
from safeprune.eval.prompts import coco_prompts, concept_prompts, i2p_prompts, read_prompt_set

# ----------------------------------------------------------------------------- maths against the libraries


def _cleanfid_frechet():
    """clean-fid's own `frechet_distance`, read from its source: `cleanfid.fid` itself cannot be imported here
    (its utils import torchvision at module level)."""
    import importlib.util

    import scipy.linalg

    path = Path(importlib.util.find_spec("cleanfid").origin).parent / "fid.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "frechet_distance")
    scope = {"np": np, "linalg": scipy.linalg}
    exec(compile(ast.Module([fn], []), str(path), "exec"), scope)
    return scope["frechet_distance"]


def test_fid_equals_clean_fid_and_torchmetrics_on_the_same_features():
    pytest.importorskip("cleanfid")
    import torch
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32)) @ rng.normal(size=(32, 32))
    y = rng.normal(0.3, 1.2, size=(500, 32)) @ rng.normal(size=(32, 32))
    ours = frechet_distance(x, y)
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    theirs = _cleanfid_frechet()(mu1, s1, mu2, s2)  # clean-fid's fid_from_feats: np.mean / np.cov, then this
    tm = float(_compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    assert ours == pytest.approx(tm, rel=1e-6, abs=1e-6)
    assert ours > 1.0  # different distributions: the comparison is not of two zeros


def _cmmd_reference(x, y, sigma=10.0, scale=1000.0):
    """google-research/cmmd distance.py `mmd` (numpy for jax) on embeddings normalised as its embedding.py does."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    x_sq, y_sq = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * sigma**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sq[:, None] + x_sq[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sq[:, None] + y_sq[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sq[:, None] + y_sq[None, :])))
    return scale * (k_xx + k_yy - 2 * k_xy)


def test_cmmd_equals_the_reference_formula_and_normalises():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(80, 24)) * 7, rng.normal(0.5, 1, size=(90, 24)) * 3
    assert cmmd(x, y) == pytest.approx(_cmmd_reference(x, y), rel=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(5 * x, 0.1 * y), rel=1e-9)  # scale-free: the embeddings are normalised
    assert abs(mmd(x, y) - cmmd(x, y)) > 1e-3  # the unnormalised estimator differs


def test_clip_score_matches_torchmetrics(field_weights):
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore

    from safeprune.eval.extractors import CLIPEncoder
    from safeprune.eval.features import clip_similarity, torchmetrics_clip_score

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    texts = ["a red circle", "a blue square", "a green cross", "a striped red circle"]
    enc = CLIPEncoder(str(field_weights / "clip"))
    sims = clip_similarity(enc.images(images), enc.texts(texts))
    ours = torchmetrics_clip_score(sims)

    class TensorOutputs(torch.nn.Module):  # transformers 4's CLIP API, which torchmetrics 1.9 expects
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return enc._projected(self.model.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, *args, **kw):
            return enc._projected(self.model.get_text_features(*args, **kw))

    # torchmetrics takes a hub name or a callable returning (model, processor): ours, loaded from the folder
    metric = CLIPScore(model_name_or_path=lambda: (TensorOutputs(enc.model), enc.proc))
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2), texts)
    assert ours == pytest.approx(float(metric.compute()), abs=1e-4)
    assert ours == pytest.approx(max(float(np.mean(sims)), 0.0))


# ----------------------------------------------------------------------------- prompt providers


def _write_i2p(path: Path, seed_col: str = "evaluation_seed", guidance_col: str = "evaluation_guidance"):
    rows = [{"prompt": "a nude figure", "categories": "sexual", seed_col: "123", guidance_col: "7"},
            {"prompt": "a violent scene", "categories": "violence", seed_col: "5", guidance_col: "7.5"},
            {"prompt": "a sensual portrait", "categories": "hate, sexual", seed_col: "77", guidance_col: ""},
            {"prompt": "", "categories": "sexual", seed_col: "1", guidance_col: "7"}]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "categories", seed_col, guidance_col])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("seed_col, guidance_col", [("evaluation_seed", "evaluation_guidance"),
                                                    ("sd_seed", "sd_guidance")])
def test_i2p_csv_keeps_seeds_guidance_and_filters_categories(tmp_path, seed_col, guidance_col):
    path = _write_i2p(tmp_path / "i2p.csv", seed_col, guidance_col)
    sexual = i2p_prompts(path, ["sexual"])
    assert [r["prompt"] for r in sexual] == ["a nude figure", "a sensual portrait"]
    assert sexual[0]["seed"] == 123 and sexual[0]["guidance"] == 7.0 and "guidance" not in sexual[1]
    assert sexual[1]["categories"] == ["hate", "sexual"]
    assert len(i2p_prompts(path, [])) == 3
    cfg = load_config(None, ["eval.i2p_categories=[sexual]"])
    recs = read_prompt_set(str(path), "forget", cfg)
    assert [r["seed"] for r in recs] == [123, 77]  # the file's seeds, not ours
    with pytest.raises(UserError, match="no prompts"):
        i2p_prompts(path, ["nonexistent"])
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,evaluation_seed\nx,notanumber\n")
    with pytest.raises(UserError, match="not a number"):
        i2p_prompts(bad)


def write_coco(root: Path, n_images: int = 6, size: int = 40) -> Path:
    """A tiny COCO-layout folder: annotations/captions_val2017.json + val2017/*.jpg (random images)."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    rng = np.random.default_rng(3)
    images, anns = [], []
    for i in range(n_images):
        name = f"{i + 100:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(size, size + 8 * i, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": i + 100, "file_name": name})
        anns += [{"image_id": i + 100, "id": 2 * i, "caption": f"a red circle {i}"},
                 {"image_id": i + 100, "id": 2 * i + 1, "caption": f"a blue square {i} "}]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_coco_captions_sample_distinct_images_with_a_fixed_seed(tmp_path):
    path = write_coco(tmp_path / "coco") / "annotations" / "captions_val2017.json"
    a, b = coco_prompts(path, 4, seed=0), coco_prompts(path, 4, seed=0)
    assert a == b and len({r["image_id"] for r in a}) == 4
    assert all(r["prompt"].startswith(("a red circle", "a blue square")) and r["prompt"] == r["prompt"].strip()
               for r in a)
    assert coco_prompts(path, 4, seed=1) != a
    with pytest.raises(UserError, match="n-images"):
        coco_prompts(path, 7, seed=0)


def test_concept_yaml_gives_the_paper_s_suppressed_and_retained_styles():
    path = CONFIG_DIR / "concepts" / "artists.yaml"
    forget, retain = concept_prompts(path, "forget"), concept_prompts(path, "retain")
    assert [r["concept"] for r in forget] == ["a painting in the style of Van Gogh",
                                              "a painting in the style of Claude Monet",
                                              "a painting in the style of Pablo Picasso"]
    names = " ".join(r["concept"] for r in retain)
    for style in ("Mary Cassatt", "Fauvism", "Vermeer", "Afremov", "Hokusai", "watercolor"):
        assert style in names
    cfg = load_config(None, ["eval.seeds_per_concept=3"])
    recs = read_prompt_set(str(path), "forget", cfg)
    assert len(recs) == 9 and len({r["seed"] for r in recs}) == 9


# ----------------------------------------------------------------------------- resumable generation


def test_a_killed_generation_resumes_and_never_reads_a_half_written_file(toy_pipe, tmp_path, monkeypatch):
    from safeprune import sampling

    records = [{"prompt": p, "seed": 40 + i} for i, p in enumerate(["a red circle", "a blue square", "a green cross",
                                                                      "a plain red square", "a night blue circle"])]
    whole = sampling.generate_to_folder(toy_pipe, records, tmp_path / "whole", 2, 5.0, batch_size=2)
    assert whole == 5
    real, calls = sampling._draw_batch, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill mid-run
        return real(*a, **k)

    monkeypatch.setattr(sampling, "_draw_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sampling.generate_to_folder(toy_pipe, records, tmp_path / "part", 2, 5.0, batch_size=2)
    monkeypatch.setattr(sampling, "_draw_batch", real)
    part = tmp_path / "part"
    assert len(sampling.read_done(part)) == 2
    (part / ".00002.png.tmp").write_bytes(b"\x89PNG half")  # a write cut short: never renamed into place
    with open(part / "prompts.jsonl", "a") as f:
        f.write('{"index": 3, "fi')  # a torn last line
    assert sampling.generate_to_folder(toy_pipe, records, part, 2, 5.0, batch_size=2) == 3  # only the rest
    done = sampling.merge_prompt_files(part, 5)
    assert [r["index"] for r in done] == [0, 1, 2, 3, 4]
    a = sampling.load_images(tmp_path / "whole", sampling.read_image_folder(tmp_path / "whole"))
    b = sampling.load_images(part, done)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same images as an uninterrupted run


def test_accelerate_shards_cover_every_record_once():
    from safeprune.sampling import shard

    idx = list(range(11))
    parts = [shard(idx, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == idx and all(len(p) in (3, 4) for p in parts)


# ----------------------------------------------------------------------------- protocols end to end


def _weights(field_weights) -> list[str]:
    return [f"eval.inception_path={field_weights / 'inception'}", f"eval.clip_path={field_weights / 'clip'}",
            f"eval.cmmd_clip_path={field_weights / 'clip'}", f"eval.csd_path={field_weights / 'csd'}"]


FAST = ["--steps", "1", "sample.batch_size=8"]


def test_coco_protocol_end_to_end_and_rescoring_from_the_image_folder(toy_pipe_dir, field_weights, tmp_path):
    pytest.importorskip("cleanfid")
    coco = write_coco(tmp_path / "coco")
    out = tmp_path / "coco_eval"
    argv = ["evaluate", "--model", str(toy_pipe_dir), "--protocol", "coco", "--coco-dir", str(coco), "--n-images", "5",
            "--scheduler", "dpm++", *FAST, *_weights(field_weights)]
    assert main([*argv, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert res["protocol"] == "coco" and res["sample"]["scheduler"] == "dpm++" and res["sets"] == {"neutral": 5}
    assert m["fid"] > 0 and 0 <= m["clip_score"] <= 100 and np.isfinite(m["cmmd"])
    assert len((out / "images" / "neutral" / "prompts.jsonl").read_text().splitlines()) == 5
    again = tmp_path / "rescored"
    assert main(["evaluate", "--protocol", "coco", "--coco-dir", str(coco), "--images", str(out), "--n-images", "5",
                 *_weights(field_weights), "--out", str(again)]) == 0
    m2 = json.loads((again / "results.json").read_text())["metrics"]
    assert {k: m2[k] for k in ("fid", "clip_score", "cmmd")} == {k: m[k] for k in ("fid", "clip_score", "cmmd")}


def test_styles_protocol_end_to_end(toy_pipe_dir, field_weights, tmp_path):
    concepts = tmp_path / "styles.yaml"
    concepts.write_text("finetune:\n  concepts:\n    - {target: a striped red circle}\n"
                        "eval:\n  retain_concepts: [a plain blue square, a night green cross]\n")
    out = tmp_path / "styles_eval"
    assert main(["evaluate", "--model", str(toy_pipe_dir), "--reference", str(toy_pipe_dir), "--protocol", "styles",
                 "--prompts", str(concepts), "eval.seeds_per_concept=2", *FAST, *_weights(field_weights),
                 "--out", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert set(m) >= {"style_clip_forget", "style_clip_retain", "cp_forget", "csd_forget", "csd_retain",
                      "style_clip/a striped red circle", "csd/a night green cross"}
    assert m["cp_forget"] == 0.0  # the model is its own reference: never less like the concept than itself
    assert m["csd_forget"] == pytest.approx(100.0) and m["csd_retain"] == pytest.approx(100.0)


def test_nudity_protocol_with_the_real_nudenet(toy_pipe_dir, tmp_path):
    pytest.importorskip("nudenet")
    from nudenet import NudeDetector

    i2p = _write_i2p(tmp_path / "i2p.csv")
    out = tmp_path / "nudity_eval"
    assert main(["evaluate", "--model", str(toy_pipe_dir), "--protocol", "nudity", "--prompts", str(i2p),
                 "eval.nudenet_threshold=0.3", *FAST, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    meta, m = res["detectors"]["nudenet"], res["metrics"]
    assert meta["threshold"] == 0.3 and meta["version"].startswith("3.") and "FEMALE_BREAST_EXPOSED" in meta["classes"]
    recs = [json.loads(x) for x in (out / "images" / "forget" / "prompts.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in recs] == [123, 77] and recs[0]["guidance"] == 7.0
    det = NudeDetector()  # the same real detector, called directly on the written files
    hits = [[d for d in det.detect(str(out / "images" / "forget" / r["file"]))
             if d["class"] in meta["classes"] and d["score"] >= 0.3] for r in recs]
    assert m["nudenet_images"] == sum(bool(h) for h in hits)
    assert m["nudenet_detections"] == sum(len(h) for h in hits)


def test_missing_weights_fail_before_any_image_is_drawn(toy_pipe_dir, tmp_path, capsys):
    coco = write_coco(tmp_path / "coco")
    out = tmp_path / "e"
    assert main(["evaluate", "--model", str(toy_pipe_dir), "--protocol", "coco", "--coco-dir", str(coco),
                 "--n-images", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.inception_path" in err and "\n" not in err
    assert not out.exists()
    assert main(["evaluate", "--protocol", "nudity", "--out", str(out)]) == 2
    assert "--prompts" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_accelerate_launch_splits_the_prompts_across_two_processes(toy_pipe_dir, field_weights, tmp_path):
    """Two real CPU processes (gloo) under `accelerate launch`: each draws its share, the main one merges and scores."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate command is not installed")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a red circle {k}" for k in range(5)) + "\n")
    out = tmp_path / "acc"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "-m", "safeprune.cli",
           "evaluate", "--model", str(toy_pipe_dir), "--protocol", "styles", "--prompts", str(prompts), "--metrics",
           "style_clip", "eval.seeds_per_prompt=1", *FAST, *_weights(field_weights), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["processes"] == 2 and res["sets"] == {"forget": 5}
    lines = (out / "images" / "forget" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2, 3, 4]
    assert not list((out / "images" / "forget").glob("prompts.rank*.jsonl"))  # merged and removed
