"""The cache spec: an explicit, canonical JSON document whose hash is the cache key.

The key covers everything that changes the stored numbers (teacher, dataset, views, stored
dtype, top-k / sampled sparsity, format version) and nothing that does not (chunking,
compression, batch size, workers, device, paths, provenance), so equal keys mean
interchangeable caches.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kdcache.cache.errors import KdcacheError
from kdcache.cache.sparse import check_storage

FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
COMPRESSIONS = ("none", "zstd", "gzip")
DEFAULT_CHUNK_SAMPLES = 1024
# storage fields that only change the layout on disk, never the numbers
LAYOUT_ONLY = ("chunk_samples", "compression")


def _plain(obj: Any, where: str) -> Any:
    """A plain-JSON copy of obj (tuples -> lists, numpy scalars -> Python); raise otherwise."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            raise KdcacheError(f"spec field {where or '<root>'} is {obj}; expected a finite number")
        return float(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise KdcacheError(f"spec key {k!r} in {where or '<root>'} is not a string")
            out[k] = _plain(v, f"{where}.{k}" if where else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise KdcacheError(
        f"spec field {where or '<root>'} has type {type(obj).__name__}; "
        "expected plain JSON (dict, list, str, int, float, bool, None)"
    )


def canonical_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, compact); KdcacheError on anything that is not plain JSON."""
    return json.dumps(
        _plain(obj, ""), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KdcacheError(f"spec {name} is {value!r}; expected an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class CacheSpec:
    """What a cache contains; equal specs (by JSON) describe bit-identical caches."""

    teacher: dict
    dataset: dict
    views: dict
    storage: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Deep-copy into plain JSON so later mutation of the caller's dicts cannot change us.
        for name in ("teacher", "dataset", "views", "storage"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise KdcacheError(f"spec {name} is {type(value).__name__}; expected a dict")
            object.__setattr__(self, name, _plain(value, name))
        storage = {
            "dtype": "float16",
            "chunk_samples": DEFAULT_CHUNK_SAMPLES,
            "compression": "none",
            "topk": None,
            **self.storage,
        }
        if storage.get("sampled") is None:  # only sampled caches carry it: dense keys unchanged
            storage.pop("sampled", None)
        object.__setattr__(self, "storage", storage)
        if self.format_version != FORMAT_VERSION:
            raise KdcacheError(
                f"unknown cache format_version {self.format_version!r}; expected {FORMAT_VERSION}"
            )
        if storage["dtype"] not in DTYPES:
            raise KdcacheError(f"storage dtype {storage['dtype']!r}; expected one of {DTYPES}")
        if storage["compression"] not in COMPRESSIONS:
            raise KdcacheError(
                f"storage compression {storage['compression']!r}; expected one of {COMPRESSIONS}"
            )
        for sparse in ("topk", "sampled"):
            if storage.get(sparse) is not None:
                _positive_int(storage[sparse], f"storage.{sparse}")
        _positive_int(storage["chunk_samples"], "storage.chunk_samples")
        _positive_int(self.dataset.get("n"), "dataset.n")
        _positive_int(self.teacher.get("num_classes"), "teacher.num_classes")
        _positive_int(self.views.get("num_augs"), "views.num_augs")
        _positive_int(self.views.get("param_dim", 0), "views.param_dim", minimum=0)
        check_storage(storage, self.num_classes)

    def __hash__(self) -> int:
        return hash(self.to_json())

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.dataset["n"])

    @property
    def num_augs(self) -> int:
        return int(self.views["num_augs"])

    @property
    def num_classes(self) -> int:
        return int(self.teacher["num_classes"])

    @property
    def param_dim(self) -> int:
        return int(self.views.get("param_dim", 0))

    @property
    def chunk_samples(self) -> int:
        return int(self.storage["chunk_samples"])

    @property
    def dtype(self) -> str:
        return str(self.storage["dtype"])

    @property
    def compression(self) -> str:
        return str(self.storage["compression"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_samples)

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "teacher": json.loads(json.dumps(self.teacher)),
            "dataset": json.loads(json.dumps(self.dataset)),
            "views": json.loads(json.dumps(self.views)),
            "storage": dict(self.storage),
            "format_version": self.format_version,
        }

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping) -> CacheSpec:
        if not isinstance(d, Mapping):
            raise KdcacheError(f"spec is {type(d).__name__}; expected a dict")
        unknown = set(d) - {"teacher", "dataset", "views", "storage", "format_version"}
        if unknown:
            raise KdcacheError(f"unknown spec fields {sorted(unknown)}")
        missing = [k for k in ("teacher", "dataset", "views") if k not in d]
        if missing:
            raise KdcacheError(f"spec is missing {missing}")
        return cls(
            teacher=d["teacher"],
            dataset=d["dataset"],
            views=d["views"],
            storage=d.get("storage", {}),
            format_version=d.get("format_version", FORMAT_VERSION),
        )

    def key_dict(self) -> dict:
        """The part of the spec that changes the numbers (what the key hashes)."""
        d = self.to_dict()
        d["storage"] = {k: v for k, v in d["storage"].items() if k not in LAYOUT_ONLY}
        return d

    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.key_dict()).encode("utf-8")).hexdigest()

    def diff(self, other: CacheSpec) -> list[str]:
        """Dotted names of fields that differ (for errors that name the field)."""
        return _diff(self.to_dict(), other.to_dict(), "")


def _diff(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [where or "<root>"]


def describe_diff(have: CacheSpec, want: CacheSpec) -> str:
    """One line naming the first differing fields with both values."""
    names = have.diff(want)
    parts = []
    for name in names[:3]:
        parts.append(f"{name}: cache has {_get(have, name)!r}, asked {_get(want, name)!r}")
    more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
    return "; ".join(parts) + more


def _get(spec: CacheSpec, dotted: str) -> Any:
    cur: Any = spec.to_dict()
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def dataset_fingerprint(keys: Sequence[str], labels: Sequence[int]) -> str:
    """sha256 over the sample keys (length-prefixed UTF-8) and int64 labels, in order."""
    keys = list(keys)
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 1 or len(keys) != len(labels_arr):
        raise KdcacheError(
            f"fingerprint needs one label per key; got {len(keys)} keys and labels of shape "
            f"{labels_arr.shape}"
        )
    if labels_arr.size and not np.issubdtype(labels_arr.dtype, np.integer):
        raise KdcacheError(f"labels have dtype {labels_arr.dtype}; expected integers")
    h = hashlib.sha256(b"kdcache-dataset-v1\0")
    h.update(len(keys).to_bytes(8, "little"))
    for k in keys:
        if not isinstance(k, str):
            raise KdcacheError(f"sample key {k!r} is {type(k).__name__}; expected str")
        kb = k.encode("utf-8")
        h.update(len(kb).to_bytes(8, "little"))
        h.update(kb)
    h.update(labels_arr.astype("<i8").tobytes())
    return h.hexdigest()
