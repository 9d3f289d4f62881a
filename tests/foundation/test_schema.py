"""The config is the whole run: nested per-method sections, moved keys, paths from flags, CLI choices = registries."""

import argparse

import pytest
import yaml

from safeprune import cli
from safeprune.config import MOVED, load_config, to_dict
from safeprune.errors import UserError


def test_named_sections_take_a_bare_name_and_keep_their_options(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"finetune": {"unlearn": {"name": "esd", "eta": 1.5}}}))
    cfg = load_config(preset, ["finetune.unlearn=ablation"])  # a bare name changes the name only
    assert (cfg.finetune.unlearn.name, cfg.finetune.unlearn.eta) == ("ablation", 1.5)
    cfg = load_config(None, ["finetune.solver=penalty", "finetune.solver.penalty_lambda=100"])
    assert (cfg.finetune.solver.name, cfg.finetune.solver.penalty_lambda) == ("penalty", 100.0)
    preset.write_text(yaml.safe_dump({"finetune": {"unlearn": "esd"}}))
    assert load_config(preset, ["finetune.unlearn.eta=3"]).finetune.unlearn.eta == 3.0


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_moved_key_names_its_new_place(old):
    with pytest.raises(UserError, match=f"moved to '{MOVED[old]}'"):
        load_config(None, [f"{old}=1"])


def test_every_new_key_exists():
    tree = to_dict(load_config())
    flat = _flat(tree)
    for new in MOVED.values():  # a field, or a key of a mapping field (demo.overrides.two_stage)
        parent, _, _ = new.rpartition(".")
        node = tree
        for part in parent.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert new in flat or isinstance(node, dict), new


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def _resolve(argv):
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides, args.config = [w for w in extra if "=" in w], None
    return cli.resolve(args)


def test_path_flags_fill_the_config_so_config_yaml_names_every_input():
    cfg = _resolve(["finetune", "--student", "st", "--data", "d/0001", "--concept-data", "c", "--out", "123",
                    "--teacher", "t", "--forget", "a striped circle=>a circle", "--max-steps", "7"])
    assert (cfg.paths.student, cfg.paths.data, cfg.paths.concept_data, cfg.paths.out) == ("st", "d/0001", "c", "123")
    assert cfg.model.teacher == "t" and cfg.finetune.max_steps == 7  # numbers stay numbers, paths stay text
    assert [(c.target, c.anchor) for c in cfg.finetune.concepts] == [("a striped circle", "a circle")]
    cfg = _resolve(["prune", "--model", "m", "--out", "o", "--preset", "tiny", "--importance", "taylor"])
    assert (cfg.model.teacher, cfg.paths.out, cfg.prune.blocks.preset, cfg.prune.channels.importance) == \
        ("m", "o", "tiny", "taylor")


def _flag_of(dest: str) -> list[tuple[str, str]]:
    """(command, flag) pairs whose flag sets config key `dest`."""
    found = []
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.dest == dest:
                found.append((command, action.option_strings[0]))
    return found


@pytest.mark.parametrize("dest", sorted(cli.REGISTRY_FLAGS))
def test_every_registered_name_is_reachable_from_the_cli(dest):
    names = cli.REGISTRY_FLAGS[dest].names()
    assert names, f"registry behind {dest} is empty"
    places = _flag_of(dest)
    assert places, f"no CLI flag sets {dest}"
    for command, flag in places:
        for name in names:
            cfg = _resolve([command, flag, name, "--out", "o"])
            node = cfg
            for part in dest.split("."):
                node = getattr(node, part)
            assert node == name
        # a name outside the registry is a one-line usage error
        assert cli.main([command, flag, "no-such-name", "--out", "o", "--dry-run"]) == 2


def test_help_lists_the_registry_names(capsys):
    assert cli.main(["finetune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in cli.REGISTRY_FLAGS["finetune.unlearn.name"].names():
        assert name in text
