"""The model card: hub metadata, pruning summary, concepts, recipe; an evaluation adds its table (unedited cards only)."""

import yaml

from safeprune.models.card import add_results, render_card, write_card

FACTS = {"base_model": "stabilityai/stable-diffusion-2-1", "method": "channels",
         "prune_report": {"method": "channels", "ratio": 0.3, "params_before": 1000, "params_after": 700,
                          "params_ratio": 0.7, "macs_before": 2000, "macs_after": 1340, "macs_ratio": 0.67},
         "concepts": [{"target": "a painting in the style of Van Gogh", "anchor": "a painting"}],
         "recipe": {"method": "bilevel", "max_steps": 20000}}


def test_card_metadata_and_sections(tmp_path):
    text = render_card(FACTS)
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-1" and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image" and {"pruning-channels", "concept-suppression"} <= set(meta["tags"])
    assert "| params | 1,000 | 700 | 0.7 |" in text and "| macs | 2,000 | 1,340 | 0.67 |" in text
    assert "'a painting in the style of Van Gogh' -> 'a painting'" in text and "| max_steps | 20000 |" in text
    assert "Not evaluated yet" in text
    assert "method: channels, ratio: 0.3, importance: taylor, removed_share: 0.3" in render_card(
        {**FACTS, "prune_report": {**FACTS["prune_report"], "importance": "taylor", "removed_share": 0.3,
                                   "preset": "not a channels field"}})  # the method's own report fields only
    assert "base_model" not in yaml.safe_load(render_card({**FACTS, "base_model": None}).split("---")[1])


def test_results_are_added_to_an_unedited_card_only(tmp_path):
    write_card(tmp_path, FACTS)
    assert add_results(tmp_path, {"leakage": 0.07, "fd": 10.8, "label": "x"}, source="eval/")
    text = (tmp_path / "README.md").read_text()
    assert "| leakage | 0.07 |" in text and "| fd | 10.8 |" in text and "label" not in text
    (tmp_path / "README.md").write_text(text + "\nMy own notes.\n")
    assert not add_results(tmp_path, {"leakage": 0.5})
    assert (tmp_path / "README.md").read_text().endswith("My own notes.\n")
    assert not add_results(tmp_path / "nowhere", {"leakage": 0.5})
