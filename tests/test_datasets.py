"""Raw datasets: CIFAR pickles through torchvision, image folders, digits, text files."""

from __future__ import annotations

import pytest
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.cache.spec import dataset_fingerprint
from kdcache.data.datasets import RawDataset, load_dataset

from tests.conftest import cifar_arrays


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_through_torchvision(make_cifar, kind):
    root = make_cifar(kind, n_train=50, n_test=20)
    ds = load_dataset(kind, root=root, split="train")
    assert len(ds) == 50 and ds.images.shape == (50, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.keys[42] == f"{kind}/train/00042" and ds.num_classes == (
        10 if kind == "cifar10" else 100
    )
    n_cls = 10 if kind == "cifar10" else 100
    data, labels = cifar_arrays(50, n_cls, seed=0)  # what make_cifar wrote
    assert ds.labels.tolist() == labels
    assert torch.equal(ds.images, torch.from_numpy(data).reshape(50, 3, 32, 32))
    assert ds.classes[0] == ("class0" if kind == "cifar10" else "fine0")
    test = load_dataset(kind, root=root, split="test", max_samples=5)
    assert len(test) == 5 and test.keys[0] == f"{kind}/test/00000"
    assert ds.fingerprint() == dataset_fingerprint(ds.keys, ds.labels)


def test_cifar_missing_root(tmp_path):
    with pytest.raises(KdcacheError, match=r"--download") as e:
        load_dataset("cifar100", root=tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    with pytest.raises(KdcacheError, match="splits"):
        load_dataset("cifar10", root=tmp_path, split="val")


@pytest.mark.parametrize("split", ["train", None])
def test_imagefolder(make_imagefolder, split):
    root = make_imagefolder(n_per_class=3, classes=("cat", "dog"), size=(20, 16), split=split)
    ds = load_dataset("imagefolder", root=root, split="train")
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and not ds.in_ram
    prefix = "train/" if split else ""
    assert ds.keys[0] == f"{prefix}cat/000.png" and ds.keys == sorted(ds.keys)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    again = load_dataset("imagefolder", root=root, split="train")
    assert again.fingerprint() == ds.fingerprint()
    img = ds.load(4)  # decoded on demand, at native size
    assert img.size == (20, 16) and img.mode == "RGB"
    assert ds.spec()["decode"].startswith("PIL")


def test_imagefolder_errors(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(KdcacheError, match="no images"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(KdcacheError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "missing")


def test_digits_split():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 1797 // 5
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.keys[4] == "digits/train/00005" and test.keys[0] == "digits/test/00004"
    assert set(train.labels.tolist()) == set(range(10)) and train.num_classes == 10
    assert int(train.images.max()) == 255 and torch.equal(train.images[:, 0], train.images[:, 2])
    assert load_dataset("digits").fingerprint() == train.fingerprint()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_text_files(make_text_file, fmt):
    path = make_text_file(fmt=fmt, n=24, string_labels=False)
    ds = load_dataset("text", root=path)
    assert ds.modality == "text" and len(ds) == 24 and ds.num_classes == 3
    assert ds.keys[:3] == ["0", "1", "2"] and ds.labels[:3].tolist() == [0, 1, 2]
    assert [ds.load(1), ds.load(0)] == [ds.texts[1], ds.texts[0]]
    named = load_dataset(
        "text", root=make_text_file(fmt=fmt, n=24, string_labels=True, with_ids=True)
    )
    assert named.classes == ["neg", "obj", "pos"] and named.keys[0] == "doc-000"
    assert named.labels[:3].tolist() == [2, 0, 1]
    by_dir = load_dataset("text", root=path.parent, split="train")
    assert by_dir.fingerprint() == ds.fingerprint()


def test_fingerprint_stable_and_label_sensitive():
    ds = load_dataset("digits", max_samples=50)
    fp = ds.fingerprint()
    assert fp == load_dataset("digits", max_samples=50).fingerprint()
    labels = ds.labels.copy()
    labels[3] = (labels[3] + 1) % 10
    changed = RawDataset(ds.name, ds.split, ds.keys, labels, 10, images=ds.images)
    assert changed.fingerprint() != fp
    assert ds.spec() == {"name": "digits", "split": "train", "n": 50, "fingerprint": fp}


def test_unknown_dataset():
    with pytest.raises(KdcacheError, match="cifar10, cifar100, digits, .*hfds:, .*wds:"):
        load_dataset("mnist")
