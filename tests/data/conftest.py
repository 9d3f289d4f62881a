"""Small image-caption fixtures written in tmp dirs: an image folder, parquet via `datasets`, webdataset shards."""

import io

import pytest

from safeprune.data.toyworld import ToyWorld

N = 12  # images per fixture: enough for 3 shards of 4 and two epochs of batch 4


def toy_records(n=N):
    """[(PIL image 32x32, caption, labels)] of the toy finetune split."""
    from PIL import Image

    world = ToyWorld()
    return [(Image.fromarray(img), cap, lab.as_dict()) for img, cap, lab in
            (world.sample("finetune", i) for i in range(n))]


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, records, per_shard=4, caption_key="txt"):
    """webdataset shards folder/000.tar, 001.tar, ... of KEY.png + KEY.txt (+ KEY.json labels)."""
    import json

    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(records), per_shard):
        with wds.TarWriter(str(folder / f"{s // per_shard:03d}.tar")) as sink:
            for i, (image, caption, labels) in enumerate(records[s:s + per_shard], s):
                sample = {"__key__": f"{i:06d}", "png": png(image), "json": json.dumps(labels).encode()}
                if caption_key:
                    sample[caption_key] = caption.encode()
                sink.write(sample)
    return folder


@pytest.fixture(scope="session")
def make_shards():
    """make_shards(folder, records, per_shard=4, caption_key="txt") writes webdataset shards."""
    return write_shards


@pytest.fixture(scope="session")
def records():
    return toy_records()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folder") / "images"
    ToyWorld().export(folder, "finetune", N)
    return folder


@pytest.fixture(scope="session")
def parquet_file(tmp_path_factory, records):
    datasets = pytest.importorskip("datasets")
    path = tmp_path_factory.mktemp("parquet") / "train.parquet"
    datasets.Dataset.from_dict({"image": [r[0] for r in records], "text": [r[1] for r in records]}).to_parquet(
        str(path))
    return path


@pytest.fixture(scope="session")
def shard_folder(tmp_path_factory, records):
    pytest.importorskip("webdataset")
    return write_shards(tmp_path_factory.mktemp("shards") / "shards", records)
