"""benchmarks/levers.py: equal budgets for every lever, one-line errors, the goal read per seed from the jsonl."""

import json

import pytest
from benchmark_helpers import load_benchmark


@pytest.fixture
def levers():
    return load_benchmark("levers")


@pytest.mark.parametrize("lever", ["base", "anchor_xt", "student_xt", "preserve", "penalty_paper", "warmup", "xattn"])
def test_every_lever_has_the_same_lower_and_upper_budget(levers, lever):
    from safeprune.bilevel import build_method

    base = levers.leak_atlas.build_config("style:striped", "channels", list(levers.BASE), False)
    cfg = levers.leak_atlas.build_config("style:striped", "channels", [*levers.BASE, *levers.LEVERS[lever]], False)
    method, ref = build_method(cfg.finetune), build_method(base.finetune)
    assert method.total_steps == ref.total_steps
    assert method.upper_steps * cfg.finetune.upper.batch_size == ref.upper_steps * base.finetune.upper.batch_size


def test_bad_arguments_are_one_line_errors(levers, tmp_path, capsys):
    out = tmp_path / "levers"
    assert levers.main(["--out", str(out), "--seeds", "0"]) == 2  # a reported seed
    assert levers.main(["--out", str(out), "--levers", "anchor"]) == 2
    assert levers.main(["--out", str(out), "--lever", "combo=finetune.upper.images=teacher"]) == 2
    assert levers.main(["--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 4 and "Traceback" not in err and "'anchor'" in err
    assert not (out / "levers.jsonl").exists()
    # a lever whose overrides changed since its rows ran is refused, not mixed into one table
    out.mkdir()
    (out / "levers.jsonl").write_text(json.dumps({"concept": "style:striped", "seed": 1000, "row": "preserve",
                                                  "overrides": ["finetune.upper.preserve=0.5"]}) + "\n")
    assert levers.main(["--out", str(out), "--levers", "preserve", "--seeds", "1000"]) == 2
    assert "lever 'preserve' ran with" in capsys.readouterr().err
    # held-out seeds only with --heldout, and never into a folder of development runs (or the other way round)
    assert levers.main(["--out", str(out), "--heldout", "--seeds", "1000"]) == 2
    assert levers.main(["--out", str(out), "--heldout", "--seeds", "0", "--levers", "preserve"]) == 2
    assert "holds development runs" in capsys.readouterr().err


def test_the_goal_needs_every_seed(levers, tmp_path):
    def rec(row, seed, leak, fd, valid=1.0):
        return {"concept": "style:striped", "seed": seed, "row": row, "overrides": [], "leakage": leak,
                "forget_valid": valid, "retention": 0.95, "fd": fd}

    records = [rec("distill", 1000, 0.9, 10.0), rec("distill", 1001, 0.8, 10.0),
               rec("good", 1000, 0.05, 10.5), rec("good", 1001, 0.1, 11.0),
               rec("costly", 1000, 0.05, 10.5), rec("costly", 1001, 0.05, 11.5),  # 1.15x on one seed
               rec("blank", 1000, 0.0, 9.0, valid=0.8), rec("blank", 1001, 0.0, 9.0)]  # erases objects on one
    # a concept distill does not leak: the goal is "no harm" (a little leakage is fine, re-teaching is not)
    records += [{**r, "concept": "style:checkered"} for r in
                (rec("distill", 1000, 0.0, 10.0), rec("distill", 1001, 0.02, 10.0), rec("calm", 1000, 0.03, 10.0),
                 rec("calm", 1001, 0.06, 10.5), rec("reteach", 1000, 0.09, 10.0), rec("reteach", 1001, 0.0, 10.0))]
    (tmp_path / "levers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = levers.write_report(tmp_path).read_text()
    striped, checkered = md.split("## style:checkered")
    goal = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in striped.splitlines()
            if line.startswith("| ") and not line.startswith("| lever")}
    assert goal == {"distill": "-", "good": "**yes**", "costly": "no", "blank": "no"}
    assert "## style:striped: suppress" in striped and checkered.startswith(": no harm")
    assert "| calm |" in checkered and checkered.split("| calm |")[1].splitlines()[0].endswith("**yes** |")
    assert checkered.split("| reteach |")[1].splitlines()[0].endswith(" no |")
    assert "(1.15x)" in md and (tmp_path / "levers.png").stat().st_size > 1000


def test_each_lever_runs_as_named_whatever_the_demos_default(levers):
    """With the demo's bilevel default now on-policy x_t, an unpinned `base` would run student_xt; a lever's own
    fields must win over the pinned entry."""
    from safeprune.config import load_config, to_dict

    def upper(lever):  # the upper section bilevel's row runs with (demo.overrides applied, as finetune_row does)
        cfg = levers.leak_atlas.build_config("style:striped", "channels", [*levers.BASE, *levers.LEVERS[lever]], False)
        return load_config(base=to_dict(cfg), overrides=cfg.demo.overrides["bilevel"]).finetune.upper

    assert upper("base").images == "" and upper("base").lr == 5e-4  # the loss's own x_t: concept images
    assert upper("anchor_xt").images == "anchor" and upper("student_xt").images == "student"
