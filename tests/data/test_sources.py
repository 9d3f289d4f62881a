"""Every source read through the real code path: image folder, parquet / arrow via `datasets`, streaming,
webdataset shards; one-line UserErrors for corrupt, incomplete, empty and off-line sources."""

import numpy as np
import pytest
import torch

from safeprune.data.datasets import ImageFolder, open_image_captions, open_source, to_model_image
from safeprune.data.toyworld import ToyWorld
from safeprune.errors import UserError

datasets = pytest.importorskip("datasets")
pytest.importorskip("webdataset")


def _all(source):
    """[(caption, (3, 32, 32) tensor)] of a map-style or iterable source, in its unshuffled order."""
    rows = (source.record(i) for i in range(len(source))) if hasattr(source, "record") else \
        source.records(seed=0, epoch=0, rank=0, world=1, shuffle_buffer=0)
    return [(r["text"], to_model_image(r["image"], 32)) for r in rows]


def _expected(records):
    return [(cap, to_model_image(img, 32)) for img, cap, _ in records]


@pytest.mark.parametrize("kind", ["folder", "parquet", "parquet_dir", "parquet_streaming", "arrow_disk",
                                  "shards_dir", "shards_brace"])
def test_every_source_yields_the_same_records(kind, records, image_folder, parquet_file, shard_folder, tmp_path):
    if kind == "arrow_disk":
        datasets.load_dataset("parquet", data_files=str(parquet_file), split="train").save_to_disk(str(tmp_path / "d"))
    source = {"folder": image_folder, "parquet": parquet_file, "parquet_dir": parquet_file.parent,
              "parquet_streaming": parquet_file, "arrow_disk": tmp_path / "d", "shards_dir": shard_folder,
              "shards_brace": f"{shard_folder}/{{000..002}}.tar"}[kind]
    data = open_source(source, streaming=kind.endswith("streaming"))
    assert (not hasattr(data, "record")) == (kind.startswith("shards") or kind.endswith("streaming"))
    got, want = _all(data), _expected(records)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))  # PNG is lossless


def test_shard_labels_and_pool_items(shard_folder, records):
    items = open_image_captions(shard_folder, world=ToyWorld(), split="finetune", n_toy=5, size=16)
    assert len(items) == 5 and items[4]["image"].shape == (3, 16, 16)
    assert items[4]["labels"] == records[4][2] and items[4]["text"] == records[4][1]


def _one_line_error(fn, match):
    with pytest.raises(UserError, match=match) as err:
        fn()
    assert len(str(err.value).splitlines()) == 1
    return str(err.value)


def test_corrupt_incomplete_and_empty_sources(tmp_path, records, make_shards):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "000.tar").write_bytes(b"this is not a tar archive" * 40)
    _one_line_error(lambda: open_source(tmp_path / "bad"), "not a tar file")
    make_shards(tmp_path / "one", records[:2], per_shard=2)
    _one_line_error(lambda: open_source(f"{tmp_path}/one/{{000..001}}.tar"), "001.tar.*not found")
    (tmp_path / "cut").mkdir()  # a shard cut off in the middle of its first image
    (tmp_path / "cut" / "000.tar").write_bytes((tmp_path / "one" / "000.tar").read_bytes()[:700])
    _one_line_error(lambda: open_source(tmp_path / "cut"), "cannot be read|not a tar file")
    make_shards(tmp_path / "nocap", records[:2], caption_key=None)
    _one_line_error(lambda: open_source(tmp_path / "nocap"), "has no caption")
    import tarfile
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    _one_line_error(lambda: open_source(tmp_path / "empty.tar"), "holds no samples")

    datasets.Dataset.from_dict({"image": [r[0] for r in records[:2]], "label": [1, 2]}).to_parquet(
        str(tmp_path / "nocap.parquet"))
    _one_line_error(lambda: open_source(tmp_path / "nocap.parquet"), "no caption column")
    _one_line_error(lambda: open_source(tmp_path / "nocap.parquet", streaming=True), "no caption column")
    datasets.Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "noimage.parquet"))
    _one_line_error(lambda: open_source(tmp_path / "noimage.parquet"), "no `image` column")
    empty = datasets.Dataset.from_dict({"image": [], "text": []}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    _one_line_error(lambda: open_source(tmp_path / "empty.parquet"), "is empty")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    _one_line_error(lambda: open_source(tmp_path / "junk.parquet"), "cannot read dataset")


def test_hub_ids_need_an_explicit_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = _one_line_error(lambda: open_source("someone/laion-art"), "finetune.data.hub_data=true")
    assert "not a local path" in message
    _one_line_error(lambda: open_source("someone/laion-art", hub=True), "cannot read dataset 'someone/laion-art'")
    _one_line_error(lambda: open_source(tmp_path / "a" / "b" / "c"), "not found")


def test_folder_images_come_back_unchanged(image_folder):
    folder = ImageFolder(image_folder, 32)
    record = folder.record(3)
    assert record["key"] == folder.records[3]["file_name"]
    assert np.array_equal(np.asarray(record["image"]), np.asarray(ToyWorld().sample("finetune", 3)[0]))
