import json

import pytest
import yaml

from safeprune.cli import COMMANDS, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    code = main(["--help"])
    out = capsys.readouterr().out
    assert code == 0 and all(name in out for name in COMMANDS)


def test_dry_run_prints_resolved_config(capsys):
    code, out, _ = run(capsys, "prune", "--out", "x", "--ratio", "0.3", "finetune.lr=0.01", "--dry-run")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["prune"]["ratio"] == 0.3 and cfg["finetune"]["lr"] == 0.01


@pytest.mark.parametrize("argv", [
    ["toyworld", "preview", "--out", "{tmp}", "nosuch.key=1"],
    ["toyworld", "export", "{tmp}/e", "--split", "nosuch", "--n", "3"],
    ["toyworld", "export", "{tmp}/e", "--n", "0"],
    ["toyworld", "preview", "--out", "{tmp}", "toyworld.forbidden_styles=[glitter]"],
    ["toyworld", "preview", "--out", "{tmp}", "--config", "{tmp}/missing.yaml"],
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, argv):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "preview.png").exists()


def test_argparse_errors_are_one_line_exit_2(capsys):
    code = main(["toyworld", "preview", "--out", "x", "--bogus"])
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_preview_and_export(capsys, tmp_path):
    assert run(capsys, "toyworld", "preview", "--out", str(tmp_path / "p"))[0] == 0
    assert (tmp_path / "p" / "preview.png").stat().st_size > 1000
    assert run(capsys, "toyworld", "export", str(tmp_path / "e"), "--split", "finetune", "--n", "200")[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "e" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and len(list((tmp_path / "e").glob("*.png"))) == 200
    assert not any("striped" in r["text"] or r["style"] == "striped" for r in rows)
    # a second export into the same folder must not silently overwrite it
    assert run(capsys, "toyworld", "export", str(tmp_path / "e"), "--n", "2")[0] == 2
