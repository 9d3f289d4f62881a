"""safeprune.recipes.pareto: per-configuration points, fronts over valid points, set dominance."""

import pytest

from safeprune.recipes import pareto


def _rec(method, config, seed, leakage, fd, valid=1.0):
    return {"method": method, "config": config, "seed": seed, "leakage": leakage, "fd": fd,
            "forget_valid": valid, "retention": 1.0, "overrides": []}


RECORDS = [_rec("distill", 0, 1000, 0.9, 10.0), _rec("distill", 0, 1001, 0.8, 20.0),
           _rec("a", 0, 1000, 0.1, 11.0), _rec("a", 0, 1001, 0.3, 22.0),  # leak 0.2, ratio 1.1
           _rec("a", 1, 1000, 0.5, 10.0), _rec("a", 1, 1001, 0.5, 20.0),  # leak 0.5, ratio 1.0
           _rec("b", 0, 1000, 0.4, 12.0), _rec("b", 0, 1001, 0.4, 24.0),  # leak 0.4, ratio 1.2: dominated by a0
           _rec("b", 1, 1000, 0.0, 10.0, valid=0.5), _rec("b", 1, 1001, 0.0, 10.0, valid=0.5)]  # blank: never on a front


def test_points_average_seeds_with_fd_relative_to_the_same_seeds_distill():
    pts = pareto.points(RECORDS)
    a0 = pts["a"][0]
    assert a0["leakage"] == pytest.approx(0.2) and a0["leakage_std"] == pytest.approx(0.1)
    assert a0["fd_ratio"] == pytest.approx(1.1) and a0["fd_ratio_std"] == pytest.approx(0.0)
    assert "distill" not in pts


def test_fronts_skip_blank_images_and_dominance_is_one_sided():
    pts = pareto.points(RECORDS)
    assert [p["config"] for p in pareto.front(pts["a"])] == [0, 1]
    assert [p["config"] for p in pareto.front(pts["b"])] == [0]  # config 1 erased the objects
    assert pareto.dominates(pts["a"], pts["b"]) and not pareto.dominates(pts["b"], pts["a"])
    assert not pareto.dominates([{**p, "forget_valid": 0.0} for p in pts["a"]], pts["b"])


def test_plot_and_table(tmp_path):
    pts = pareto.points(RECORDS)
    assert pareto.plot(pts, tmp_path / "p.png").stat().st_size > 1000
    text = pareto.markdown(pts, focus="a")
    assert "a's front dominates b's: yes" in text and "b's dominates a's: no" in text
