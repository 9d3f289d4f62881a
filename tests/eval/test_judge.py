"""The judge: reads real toy images correctly (held-out seeds), calls noise "no object", loads safely, trains
deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safeprune.config import load_config
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError
from safeprune.eval.judge import load_judge
from safeprune.recipes.judge import NEGATIVES, train_judge


def test_judge_reads_real_toy_images_from_an_unseen_seed(judge):
    images, _, labels = ToyWorld(seed=4242).batch("pretrain", 0, 400)
    pred = judge.predict(images)
    assert pred["valid"].mean() >= 0.98
    for attr in ("shape", "colour", "style"):
        acc = np.mean([p == getattr(lb, attr) for p, lb in zip(pred[attr], labels)])
        assert acc >= 0.98, (attr, acc)


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "smooth_noise", "constant"])
def test_judge_says_no_object_on_noise_and_blank_images(judge, kind):
    g = torch.Generator().manual_seed(7)
    images = NEGATIVES[kind](ToyWorld(seed=7), g, 200, 32).clamp(0, 1)
    pred = judge.predict(images)
    assert 1 - pred["valid"].mean() >= 0.98
    invalid = ~pred["valid"]
    assert all(pred["style"][i] is None and pred["colour"][i] is None for i in np.flatnonzero(invalid))


def test_predict_accepts_layouts_and_sizes_and_is_batch_independent(judge):
    images = ToyWorld(seed=1).batch("pretrain", 0, 6)[0]  # uint8 (6, 32, 32, 3)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (6, 3, 32, 32) in [0, 1]
    a, b = judge.predict(images), judge.predict(as_float)
    assert a["style"] == b["style"] and np.allclose(a["p_valid"], b["p_valid"], atol=1e-5)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 64x64 input is resized to the judge's 32
    assert judge.predict(big)["shape"] == a["shape"]
    assert a["probs"]["style"].shape == (6, 6) and np.allclose(a["probs"]["colour"].sum(1), 1, atol=1e-5)
    feats = judge.features(images)
    assert feats.shape == (6, judge.meta["feature_dim"])
    assert np.allclose(judge.features(images[2:3]), feats[2:3], atol=1e-5)  # eval-mode BN: no batch coupling


def test_load_judge_names_a_missing_or_corrupt_file(tmp_path, judge):
    with pytest.raises(UserError, match="judge.json"):
        load_judge(tmp_path)
    judge.save(tmp_path)
    assert load_judge(tmp_path).predict(np.zeros((1, 32, 32, 3), np.uint8))["valid"].shape == (1,)
    (tmp_path / "judge.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="judge.safetensors") as err:
        load_judge(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "judge.json").write_text("{broken")
    with pytest.raises(UserError, match="judge.json"):
        load_judge(tmp_path)


def test_train_judge_writes_its_files_and_is_deterministic(tmp_path):
    cfg = load_config(None, ["judge.steps=4", "judge.batch_size=16"])
    metrics = train_judge(cfg, tmp_path / "a")
    train_judge(cfg, tmp_path / "b")
    for name in ("judge.safetensors", "judge.json", "metrics.json"):
        assert (tmp_path / "a" / name).is_file()
    assert set(json.loads((tmp_path / "a" / "metrics.json").read_text())) >= {"real", "no_object", "train_seconds"}
    assert set(metrics["real"]) == {"shape", "colour", "style", "valid"}
    a, b = load_judge(tmp_path / "a").net.state_dict(), load_judge(tmp_path / "b").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="not empty"):  # atomic output: never overwrite a finished judge
        train_judge(cfg, tmp_path / "a")


def test_pretrain_judge_cli_rejects_resume(tmp_path, capsys):
    from safeprune.cli import main

    assert main(["pretrain", "judge", "--out", str(tmp_path / "j"), "--resume"]) == 2
    assert "resume" in capsys.readouterr().err
