"""`safeprune prune` plans a `channels` pruning of the SD 2.1 UNet on the meta device (seconds, no weights)."""

import json

import pytest
from pruning_helpers import ASSETS

from safeprune.cli import main


def test_sd21_channels_ratio_02_reports_params_and_macs(capsys, tmp_path):
    code = main(["prune", "--unet-config", str(ASSETS / "sd21_unet_config.json"), "--method", "channels",
                 "--ratio", "0.2", "--out", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "d" / "prune_report.json").read_text())
    assert report["params_before"] / 1e6 == pytest.approx(865.9, abs=0.1)  # the SD 2.1 UNet
    assert report["params_ratio"] == pytest.approx(0.8, abs=0.01) and report["weights"] is False
    assert 0.75 < report["macs_ratio"] < 0.85 and report["macs_before"] > 1e12  # one call at 96x96 latents
    assert (tmp_path / "d" / "plan.json").is_file() and not (tmp_path / "d" / "config.json").exists()
