"""Streaming dataset sources: imagefolder (native JPEGs), hfds: (save_to_disk, parquet, text),
wds: tar shards (local and loopback S3), missing splits and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import Dataset, ViewPolicy
from kdcache.data.datasets import SOURCES, load_dataset
from kdcache.data.views import POLICIES, get_policy

from tests.datatools import (
    hf_image_dataset,
    image_samples,
    jpeg_bytes,
    make_jpeg_folder,
    sizes,
    write_shard,
)


def test_registries_carry_help_and_protocols():
    load_dataset("digits", max_samples=2)  # registers the streaming sources
    for key in ("cifar10", "cifar100", "digits", "imagefolder", "text", "hfds:", "wds:"):
        assert key in SOURCES and SOURCES[key].help and "\n" not in SOURCES[key].help
    assert SOURCES["cifar10"].help != SOURCES["cifar100"].help
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.help and cls.param_names and cls.modality
    from kdcache.models.factory import MODEL_SOURCES

    assert set(MODEL_SOURCES) == {"timm", "tv:", "hf:", "cifar"}
    assert all(s.help for s in MODEL_SOURCES.values())
    assert isinstance(get_policy("rrc-flip"), ViewPolicy)
    assert isinstance(load_dataset("digits", max_samples=2), Dataset)


def test_imagefolder_is_lazy_native_and_split_strict(tmp_path, monkeypatch):
    root = make_jpeg_folder(tmp_path / "f", per_class=3)
    import PIL.Image

    opened = []
    real = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or real(*a, **k))
    ds = load_dataset("imagefolder", root=root, split="train")
    assert opened == [] and isinstance(ds, Dataset)  # listing only, nothing decoded
    assert ds.keys[0] == "train/a/000.jpg" and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.load(4).size == sizes(6)[4] and len(opened) == 1  # native resolution
    with pytest.raises(KdcacheError, match=r"no split 'val'.*'train'"):
        load_dataset("imagefolder", root=root, split="val")
    flat = make_jpeg_folder(tmp_path / "flat", per_class=1, split=None)
    assert len(load_dataset("imagefolder", root=flat, split="train")) == 2
    with pytest.raises(KdcacheError, match=r"no split 'test'.*train \(the class folders"):
        load_dataset("imagefolder", root=flat, split="test")  # never a silent fallback


def test_corrupt_image_names_the_file(tmp_path):
    root = make_jpeg_folder(tmp_path / "f", per_class=2)
    (root / "train/b/001.jpg").write_bytes(b"not a jpeg")
    ds = load_dataset("imagefolder", root=root)
    with pytest.raises(KdcacheError, match=r"cannot decode image .*train/b/001\.jpg"):
        ds.load(3)


@pytest.mark.parametrize("form", ["save_to_disk", "dict", "parquet", "arrow"])
def test_hfds_images(tmp_path, form):
    import datasets

    hf = hf_image_dataset(6)
    if form == "save_to_disk":
        hf.save_to_disk(str(tmp_path / "d"))
        path = tmp_path / "d"
    elif form == "dict":
        datasets.DatasetDict({"train": hf, "validation": hf.select(range(2))}).save_to_disk(
            str(tmp_path / "d")
        )
        path = tmp_path / "d"
    elif form == "parquet":
        hf.to_parquet(str(tmp_path / "d.parquet"))
        path = tmp_path / "d.parquet"
    else:
        hf.save_to_disk(str(tmp_path / "d"))
        path = next((tmp_path / "d").glob("*.arrow"))
    ds = load_dataset(f"hfds:{path}", split="train")
    assert ds.modality == "image" and len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2] and ds.keys[1] == "00000001"
    assert ds.load(2).size == sizes(6)[2]
    if form == "dict":
        assert len(load_dataset(f"hfds:{path}", split="validation")) == 2
        with pytest.raises(KdcacheError, match=r"no split 'test'.*'train', 'validation'"):
            load_dataset(f"hfds:{path}", split="test")
    else:
        with pytest.raises(KdcacheError, match=r"no split 'test'; splits that exist: 'train'"):
            load_dataset(f"hfds:{path}", split="test")


def test_hfds_text_columns_and_errors(tmp_path):
    import datasets

    hf = datasets.Dataset.from_dict(
        {"sentence": ["a b", "c", "d e f"], "y": ["neg", "pos", "neg"], "id": ["p", "q", "r"]}
    )
    hf.save_to_disk(str(tmp_path / "t"))
    with pytest.raises(KdcacheError, match="no label column .*--label-column"):
        load_dataset(f"hfds:{tmp_path / 't'}")
    ds = load_dataset(f"hfds:{tmp_path / 't'}", label_column="y")
    assert ds.modality == "text" and ds.load(2) == "d e f" and ds.keys == ["p", "q", "r"]
    assert ds.classes == ["neg", "pos"] and ds.labels.tolist() == [0, 1, 0]
    with pytest.raises(KdcacheError, match="no text column 'body'"):
        load_dataset(f"hfds:{tmp_path / 't'}", label_column="y", text_column="body")
    bad = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, -3]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(KdcacheError, match="column 'label' row 1 has unknown label -3"):
        load_dataset(f"hfds:{tmp_path / 'bad'}")


def test_wds_local_index_cache_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "idx"))
    samples = image_samples(7)
    write_shard(tmp_path / "s-000.tar", samples[:4])
    write_shard(tmp_path / "s-001.tar", samples[4:])
    ds = load_dataset(f"wds:{tmp_path}/s-{{000..001}}.tar")
    assert ds.keys == [k for k, _, _ in samples] and ds.labels.tolist() == [s[2] for s in samples]
    assert ds.load(5).size == sizes(7)[5] and len(list((tmp_path / "idx").iterdir())) == 2
    import kdcache.data.wds as data_wds

    monkeypatch.setattr(data_wds, "_scan", lambda *a: pytest.fail("index not reused"))
    assert load_dataset(f"wds:{tmp_path}/s-{{000..001}}.tar").keys == ds.keys
    monkeypatch.undo()
    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "idx"))
    with pytest.raises(KdcacheError, match=r"no split 'val'"):
        load_dataset(f"wds:{tmp_path}/s-000.tar", split="val")
    write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(KdcacheError, match=r"wds shard .*empty\.tar is empty"):
        load_dataset(f"wds:{tmp_path}/empty.tar")
    with pytest.raises(KdcacheError, match=r"wds shard .*nope\.tar does not exist"):
        load_dataset(f"wds:{tmp_path}/nope.tar")
    assert data_wds.expand_braces("a{08..10}{x,y}") == [
        "a08x",
        "a08y",
        "a09x",
        "a09y",
        "a10x",
        "a10y",
    ]


def test_wds_over_s3(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    from tests.s3tools import FAKE_ENV, start_moto

    for k, v in FAKE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "idx"))
    rec, server = start_moto("shards")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", rec.endpoint)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": rec.endpoint})
        for s in range(2):
            buf = io.BytesIO()
            write_shard(buf, [(f"k{s}{i}", jpeg_bytes(320, 240, i), i) for i in range(3)])
            fs.pipe(f"shards/train-{s}.tar", buf.getvalue())
        opts = {"client_kwargs": {"endpoint_url": rec.endpoint}}
        n = len(rec.requests)
        ds = load_dataset("wds:s3://shards/{split}-{0..1}.tar", storage_options=opts)
        assert ds.keys == ["k00", "k01", "k02", "k10", "k11", "k12"]
        assert ds.load(4).size == (320, 240) and rec.writes(n) == []
        with pytest.raises(KdcacheError, match=r"s3://shards/test-0\.tar does not exist"):
            load_dataset("wds:s3://shards/{split}-{0..1}.tar", split="test", storage_options=opts)
    finally:
        server.stop()


def test_text_missing_split(make_text_file):
    path = make_text_file("jsonl", n=6)
    with pytest.raises(KdcacheError, match=r"no split 'test'.*'train'"):
        load_dataset("text", root=path.parent, split="test")
    assert np.array_equal(load_dataset("text", root=path.parent).labels[:3], [0, 1, 2])
