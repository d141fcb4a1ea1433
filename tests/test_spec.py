"""CacheSpec: canonical JSON, content key, validation, dataset fingerprint."""

import json

import numpy as np
import pytest
from kdcache.cache.errors import KdcacheError
from kdcache.cache.spec import CacheSpec, canonical_json, dataset_fingerprint


def make(**over) -> CacheSpec:
    d = {
        "teacher": {"name": "resnet18", "source": "timm", "weights_sha256": "ab" * 32,
                    "num_classes": 10, "preprocessing": {"mean": [0.5, 0.5], "std": [0.2, 0.2]}},
        "dataset": {"name": "toy", "split": "train", "n": 100, "fingerprint": "f" * 64},
        "views": {"policy": "crop_flip", "params": {"scale": [0.08, 1.0]}, "num_augs": 4,
                  "seed": 0, "identity_view": True, "param_dim": 5},
        "storage": {"dtype": "float16", "chunk_samples": 32, "compression": "none", "topk": None},
    }  # fmt: skip
    for dotted, value in over.items():
        section, field = dotted.split("__")
        d[section][field] = value
    return CacheSpec.from_dict(d)


def test_equal_spec_same_key_and_json():
    a, b = make(), make()
    assert a == b and hash(a) == hash(b)
    assert a.key() == b.key() and len(a.key()) == 64
    assert a.to_json() == b.to_json()
    assert CacheSpec.from_dict(json.loads(a.to_json())) == a


def test_key_changes_with_numbers():
    base = make().key()
    assert make(views__num_augs=8).key() != base
    assert make(storage__dtype="bfloat16").key() != base
    assert make(teacher__weights_sha256="cd" * 32).key() != base
    assert make(views__seed=1).key() != base
    assert make(storage__topk=5).key() != base


def test_key_ignores_layout_only_storage():
    base = make()
    for other in (make(storage__chunk_samples=64), make(storage__compression="zstd")):
        assert other.key() == base.key()
        assert other.to_json() != base.to_json()  # still a different layout on disk
        assert other != base


def test_canonical_json_sorted_compact_and_order_free():
    assert canonical_json({"b": 1, "a": [1, (2, 3)]}) == '{"a":[1,[2,3]],"b":1}'
    assert canonical_json({"x": np.int64(3), "y": np.float32(0.5)}) == '{"x":3,"y":0.5}'
    a = CacheSpec(teacher={"num_classes": 3, "name": "t"}, dataset={"n": 5}, views={"num_augs": 1})
    b = CacheSpec(teacher={"name": "t", "num_classes": 3}, dataset={"n": 5}, views={"num_augs": 1})
    assert a.key() == b.key()


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan"), float("inf"), b"bytes"])
def test_unserializable_field_raises(bad):
    with pytest.raises(KdcacheError, match="teacher.extra"):
        make(teacher__extra=bad)
    with pytest.raises(KdcacheError):
        canonical_json({"k": bad})


def test_spec_is_a_copy_of_caller_dicts():
    views = {"num_augs": 2, "param_dim": 1, "params": {"p": [1]}}
    spec = CacheSpec(teacher={"num_classes": 3}, dataset={"n": 5}, views=views)
    key = spec.key()
    views["params"]["p"].append(2)
    assert spec.key() == key and spec.views["params"]["p"] == [1]


def test_validation_errors():
    with pytest.raises(KdcacheError, match="dtype"):
        make(storage__dtype="int8")
    with pytest.raises(KdcacheError, match="compression"):
        make(storage__compression="lz4")
    with pytest.raises(KdcacheError, match="chunk_samples"):
        make(storage__chunk_samples=0)
    with pytest.raises(KdcacheError, match="num_augs"):
        make(views__num_augs=0)
    with pytest.raises(KdcacheError, match="format_version"):
        CacheSpec.from_dict({**make().to_dict(), "format_version": 99})
    with pytest.raises(KdcacheError, match="unknown spec fields"):
        CacheSpec.from_dict({**make().to_dict(), "batch_size": 128})


def test_defaults_and_properties():
    spec = CacheSpec(teacher={"num_classes": 3}, dataset={"n": 2049}, views={"num_augs": 2})
    assert spec.storage == {"dtype": "float16", "chunk_samples": 1024, "compression": "none",
                            "topk": None}  # fmt: skip
    assert (spec.n, spec.num_augs, spec.num_classes, spec.param_dim) == (2049, 2, 3, 0)
    assert spec.n_chunks == 3
    assert make().diff(make(views__num_augs=8)) == ["views.num_augs"]


def test_dataset_fingerprint():
    keys, labels = ["a", "b", "c"], [0, 1, 2]
    fp = dataset_fingerprint(keys, labels)
    assert fp == dataset_fingerprint(tuple(keys), np.array(labels))
    assert fp != dataset_fingerprint(keys, [0, 1, 3])
    assert fp != dataset_fingerprint(["a", "c", "b"], labels)
    assert dataset_fingerprint(["ab", "c"], [0, 0]) != dataset_fingerprint(["a", "bc"], [0, 0])
    with pytest.raises(KdcacheError, match="one label per key"):
        dataset_fingerprint(keys, [0, 1])
