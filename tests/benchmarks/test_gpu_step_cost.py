"""The GPU step-cost benchmark's CPU smoke mode: the real build and rows on a tiny SD-1.5 layout, in seconds."""

import json

import pytest
from benchmark_helpers import load_benchmark


@pytest.fixture
def bench():
    yield load_benchmark("gpu_step_cost")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # the benchmark's Accelerator must not leak its settings into later tests
    GradientState._reset_state()


def test_smoke_mode_writes_three_rows(bench, tmp_path, capsys):
    out = tmp_path / "smoke.json"
    assert bench.main(["--device", "cpu", "--tiny", "--iters", "10", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["distill", "unlearn_phase", "bilevel_alternating"]
    assert all(row["it_per_s"] > 0 and row["peak_mem_gib"] is None for row in rows.values())  # no GPU: no peak
    # What each row ran, in images per iteration (batch 2): the rows are the methods they claim to be.
    assert rows["distill"]["images_per_it"]["student_bwd"] == 2  # one lower step
    assert rows["unlearn_phase"]["images_per_it"]["student_bwd"] == 2  # one upper step
    assert rows["bilevel_alternating"]["images_per_it"]["student_bwd"] == pytest.approx(2 * (1 + 1 / bench.K))
    assert result["student_params_m"] < result["teacher_params_m"]  # the student is channel-pruned
    assert "bilevel_alternating" in capsys.readouterr().out  # the printed table


def test_cuda_without_gpu_is_a_usage_error(bench, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
