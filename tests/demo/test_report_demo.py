import json

import numpy as np
import pytest
import torch
from PIL import Image

from safeprune.cli import main
from safeprune.recipes.demo import judge_claims
from safeprune.recipes.report import _by_step, aggregate, plot_curves, table, write_report


def _row(leak, fd, valid=0.95, retention=0.9):
    return {"valid": valid, "leakage": leak, "forget_valid": valid, "retention": retention, "adherence": 0.9, "fd": fd}


def test_aggregate_mean_and_std():
    agg = aggregate([_row(0.2, 10.0), _row(0.4, 14.0)])
    assert agg["leakage"] == pytest.approx(0.3) and agg["fd"] == pytest.approx(12.0)
    assert agg["leakage_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert "leakage_std" not in aggregate([_row(0.2, 10.0)])


def test_table_shows_mean_std_and_missing_values():
    md = table({"teacher": _row(0.9, 5.0), "bilevel": aggregate([_row(0.0, 6.0), _row(0.1, 7.0)])})
    lines = md.splitlines()
    assert lines[0].startswith("| model | valid | leakage") and len(lines) == 4
    assert "0.05 ± 0.07" in lines[3] and "| teacher |" in lines[2]


def test_claims_follow_the_numbers():
    rows = {"teacher": _row(0.9, 5.0), "distill": _row(0.8, 10.0), "two_stage": _row(0.2, 14.0),
            "bilevel": _row(0.05, 10.5)}
    checks, notes = judge_claims(rows)
    assert all(checks.values()) and not any("WARNING" in n for n in notes)
    rows["distill"] = _row(0.8, 10.0, valid=0.5)  # a student that draws nothing has not recovered
    rows["bilevel"] = _row(0.3, 20.0)
    checks, notes = judge_claims(rows)
    assert not checks["students_recovered"] and not checks["bilevel_suppresses"] and "WARNING" in notes[0]


def test_report_command_from_synthetic_results(tmp_path, capsys):
    runs = []
    for name, leak in (("distill", 0.7), ("bilevel", 0.05)):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps({"metrics": _row(leak, 9.0)}))
        (run / "summary.json").write_text(json.dumps({"wall_s": 12.0}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "eval/leakage": leak, "eval/fd": 9.0 + s})
                                                     for s in (10, 20)) + "\n")
        runs.append(str(run))
    assert main(["report", *runs, "--out", str(tmp_path / "rep")]) == 0
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results["methods"]["bilevel"]["leakage"] == 0.05 and results["methods"]["distill"]["train_s"] == 12.0
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 1000
    assert "| bilevel |" in (tmp_path / "rep" / "report.md").read_text()
    # a folder without results is a one-line user error, and no report folder is left behind
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep2")]) == 2
    assert not (tmp_path / "rep2").exists()


def test_curves_get_a_recovery_panel_when_both_recovery_rows_have_curves(tmp_path):
    def curve(fd0):
        return [{"step": s, "eval/leakage": 0.5, "eval/fd": fd0 / (1 + s)} for s in (0, 10, 20)]

    assert plot_curves({"distill": curve(30.0), "bilevel": curve(31.0)}, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").width == 2 * 5 * 110  # fd and leakage
    assert plot_curves({"distill": curve(30.0), "denoise_only": curve(40.0) + curve(44.0)}, tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").width == 3 * 5 * 110  # + the recovery panel (two seeds: a std band)
    steps, mean, std = _by_step(curve(40.0) + curve(44.0), "eval/fd")
    assert steps == [0, 10, 20] and mean[0] == pytest.approx(42.0) and std[0] == pytest.approx(2.0)


def test_write_report_without_grid(tmp_path):
    path = write_report(tmp_path, {"teacher": _row(0.9, 5.0)}, {"teacher": []}, None, ["a note"])
    text = path.read_text()
    assert "a note" in text and "grid.png" not in text and not (tmp_path / "curves.png").exists()


TINY = ["finetune.max_steps=4", "finetune.batch_size=2", "finetune.upper.batch_size=2", "finetune.data.pool=8",
        "finetune.data.concept_pool=4", "finetune.upper.every=2", "finetune.warmup_steps=1", "eval.seeds_per_prompt=1",
        "eval.max_prompts=2", "eval.real_per_image=1", "eval.affinity_images=4", "eval.resurgence_steps=2",
        "sample.steps=2", "demo.curve_every=2", "demo.curve_prompts=2", "prune.ratio=0.3",
        "unlearn.conceptprune.sample_steps=4", "unlearn.conceptprune.timesteps=2"]


@pytest.fixture
def random_teacher(random_teacher_dir, monkeypatch):
    """A random-weight toy teacher in the shipped teacher's place: the demo's plumbing, not its numbers."""
    from safeprune.models import shipped

    monkeypatch.setattr(shipped, "teacher_path", lambda: random_teacher_dir)
    return random_teacher_dir


@pytest.mark.slow
def test_tiny_demo_end_to_end(random_teacher, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    for name in ("report.md", "results.json", "grid.png", "curves.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["teacher", "pruned", "denoise_only", "distill", "distill+ESD", "distill+UCE",
                                        "distill+ConceptPrune", "distill+bilevel_loss", "bilevel"]
    assert set(results["leaks"]) == set(results["methods"])  # the finding, row by row
    assert (out / "seed0" / "denoise_only" / "metrics.jsonl").is_file()
    assert Image.open(out / "curves.png").width == 3 * 5 * 110  # the recovery panel beside fd and leakage
    for row in results["methods"].values():
        assert all(k in row for k in ("valid", "leakage", "retention", "adherence", "fd"))
    assert all("resurgence_leakage" in results["methods"][k] for k in ("bilevel", "distill+UCE", "distill+ESD"))
    # the checks follow the finding (a random teacher draws no concept, so here: no harm)
    distill_leaks = results["leaks"]["distill"]
    assert ("bilevel_beats_distill+ConceptPrune" in results["checks"]) is distill_leaks
    assert ("bilevel_does_no_harm" in results["checks"]) is not distill_leaks
    assert "| bilevel |" in capsys.readouterr().out
    # equal budgets by construction: two-stage's training passes equal bilevel's (the on-policy x_t's sampling
    # passes come on top: k ~ U{0..n-1} steps per draw, so they are equal only in expectation)
    def training_passes(row):
        counts = json.loads((out / "seed0" / row / "summary.json").read_text())["counts"]
        return counts["student_fwd"], counts["student_bwd"]

    assert training_passes("distill+bilevel_loss") == training_passes("bilevel")
    assert results["per_seed"]["bilevel"][0]["student_passes"] > sum(training_passes("bilevel"))
    # ESD trains on as many images as bilevel's upper level (its own x_t sampling passes come on top)
    esd = json.loads((out / "seed0" / "distill+ESD" / "summary.json").read_text())
    assert esd["counts"]["student_bwd"] == (4 // 2) * 2
    # a second demo into the same folder replaces it; a foreign folder is refused
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "foreign"), *TINY]) == 2
    assert (tmp_path / "foreign" / "x.txt").is_file()


def _evaluation(folder, protocol, metrics, records=()):
    """A finished evaluation folder as `safeprune evaluate` writes it (images only where records are given)."""
    from PIL import Image

    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"protocol": protocol, "metrics": metrics}))
    rng = np.random.default_rng(len(str(folder)))
    for role in ("forget", "retain") if records else ():
        (folder / "images" / role).mkdir(parents=True)
        lines = []
        for k, (prompt, seed) in enumerate(records):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "images" / role / f"{k:05d}.png")
            lines.append(json.dumps({"prompt": f"{role} {prompt}", "seed": seed, "index": k, "file": f"{k:05d}.png"}))
        (folder / "images" / role / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def test_report_builds_the_paper_table_in_the_paper_s_row_order(tmp_path, capsys):
    runs = []
    values = {"bilevel": (26.3, 97.6, 39.0, 22.2, 29.2, 3), "distill+uce": (30.5, 82.7, 65.1, 26.6, 29.3, 6),
              "teacher": (34.4, 44.0, 87.9, 15.1, 31.6, 100), "distill": (34.3, 0.0, 100.0, 22.2, 29.4, 48)}
    for name, (clip, cp, csd, fid, coco_clip, nude) in values.items():
        run = tmp_path / name
        recs = [("a painting in the style of Van Gogh", 11), ("a painting in the style of Van Gogh", 12)]
        _evaluation(run / "eval" / "styles", "styles", {"style_clip_forget": clip, "cp_forget": cp,
                                                        "csd_forget": csd, "style_clip_retain": 30.0}, recs)
        _evaluation(run / "eval" / "coco", "coco", {"fid": fid, "clip_score": coco_clip, "cmmd": 0.5})
        _evaluation(run / "eval" / "nudity", "nudity", {"nudenet_images": nude})
        runs.append(str(run))
    assert main(["report", *runs, "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    for title in ("style CLIP ↓", "CP ↑", "CSD ↓", "COCO FID ↓", "COCO CLIP ↑", "NudeNet images ↓"):
        assert title in header
    order = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "model" not in line]
    assert order[:4] == ["teacher", "distill", "distill+uce", "bilevel"]
    rows = json.loads((tmp_path / "rep" / "results.json").read_text())["methods"]
    assert rows["bilevel"]["coco/fid"] == 22.2 and rows["distill"]["nudity/nudenet_vs_teacher"] == pytest.approx(-52)
    assert (tmp_path / "rep" / "grid.png").stat().st_size > 500  # Fig. 1 from the evaluated images
    assert "| bilevel | 26.30 | 97.6 | 39.00 | 22.20 |" in md


@pytest.fixture(scope="session")
def random_dit_teacher(tmp_path_factory):
    """The `toy-dit` architecture with a random transformer (the shipped VAE and CLIP, as `pretrain --arch dit`)."""
    from safeprune.models import toy
    from safeprune.recipes.pretrain import _shipped_parts

    torch.manual_seed(0)
    vae, text, tokenizer = _shipped_parts()
    folder = tmp_path_factory.mktemp("dit_teacher") / "pipe"
    toy.assemble_dit_pipeline(vae, text, text, tokenizer, toy.build_transformer()).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_tiny_demo_on_the_dit_teacher(random_dit_teacher, tmp_path):
    """`demo --arch dit`: the same rows and checks on the SD3-class teacher, with a depth-pruned student (30 % of
    the parameters: 2 of 6 blocks) that loads with the stock StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "demo"
    assert main(["demo", "--arch", "dit", "--out", str(out), f"model.teacher={random_dit_teacher}", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["teacher", "pruned", "denoise_only", "distill", "distill+bilevel_loss",
                                        "bilevel"]
    removed = results["prune"]["removed"]
    assert results["prune"]["method"] == "depth" and len(removed) == 2 and "transformer_blocks.5" not in removed
    assert ("bilevel_does_no_harm" in results["checks"]) is not results["leaks"]["distill"]
    student = StableDiffusion3Pipeline.from_pretrained(str(out / "seed0" / "bilevel" / "model"), text_encoder_3=None,
                                                      tokenizer_3=None, local_files_only=True)
    assert student.transformer.config.num_layers == 4
