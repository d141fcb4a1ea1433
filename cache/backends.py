"""Zarr v3 and HDF5 storage behind one small interface, with the same array names inside.

Backends move raw stored values by row ranges; dtype conversion, sparse codecs, checksums
and validation live in sparse.py/store.py so both backends behave alike. Zarr opens local
directories and any fsspec URL (chunk objects read/written directly); HDF5 is written locally
and read locally or through fsspec file objects. A member of a multi-teacher store is
addressed as `<store>/<member>` for both (a zarr subgroup, an HDF5 group).
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from kdcache.cache import remote
from kdcache.cache.dtypes import STORED_DTYPES, decode, encode  # noqa: F401 - re-exported
from kdcache.cache.errors import KdcacheError
from kdcache.cache.remote import is_remote, local_path, split_hdf5  # noqa: F401 - re-exported
from kdcache.cache.sparse import get_codec
from kdcache.cache.spec import CacheSpec

log = logging.getLogger(__name__)

BACKENDS = ("zarr", "hdf5")
META_KEY = "kdcache"
INNER_CHUNK_BYTES = 1 << 20  # target size of a zarr inner chunk / HDF5 chunk of logits


def infer_backend(path: str, backend: str | None = None) -> str:
    """Backend from an explicit name or the path suffix (.zarr, .h5/.hdf5)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise KdcacheError(f"unknown cache backend {backend!r}; expected one of {BACKENDS}")
        return backend
    if split_hdf5(path)[0] is not None:
        return "hdf5"
    if path.rstrip("/").lower().endswith(".zarr") or ".zarr/" in path.lower():
        return "zarr"
    raise KdcacheError(
        f"cannot tell the backend of {path!r} from its suffix; expected .zarr, .h5 or .hdf5, "
        "or pass backend='zarr'|'hdf5'"
    )


def _inner_rows(chunk_samples: int, row_bytes: int) -> int:
    """Largest divisor of chunk_samples whose rows fit INNER_CHUNK_BYTES (at least 1)."""
    target = max(1, INNER_CHUNK_BYTES // max(row_bytes, 1))
    return max(d for d in range(1, min(chunk_samples, target) + 1) if chunk_samples % d == 0)


def layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], Any, tuple[int, ...]]]:
    """name -> (shape, numpy dtype, chunk shape) of every array of a cache."""
    n, a, p = spec.n, spec.num_augs, spec.param_dim
    cs = min(spec.chunk_samples, n)
    targets = get_codec(spec).layout()
    row_bytes = max(math.prod(s[1:]) * np.dtype(dt).itemsize for s, dt, _ in targets.values())
    inner = _inner_rows(cs, row_bytes)
    col = min(n, 1 << 20)
    out: dict[str, tuple[tuple[int, ...], Any, tuple[int, ...]]] = {
        name: (shape, dt, (inner,) + shape[1:]) for name, (shape, dt, _) in targets.items()
    }
    out.update(
        view_params=((n, a, p), np.float32, (inner, a, max(p, 1))),
        labels=((n,), np.int64, (col,)),
        keys=((n,), str, (col,)),
        done=((spec.n_chunks,), np.uint8, (1,)),
        checksums=((spec.n_chunks, 32), np.uint8, (1, 32)),
    )
    return out


def row_arrays(spec: CacheSpec) -> tuple[str, ...]:
    """Arrays stored per (sample): one kdcache chunk of each is one object / shard."""
    return get_codec(spec).names + ("view_params",)


class Backend(ABC):
    """Raw access to one cache's arrays and its "kdcache" metadata."""

    name: str

    def __init__(self, path: str, writable: bool, storage_options: dict | None = None) -> None:
        self.path = path
        self.writable = writable
        self.storage_options = storage_options

    @abstractmethod
    def get_meta(self) -> dict: ...
    @abstractmethod
    def set_meta(self, meta: dict) -> None: ...
    @abstractmethod
    def has(self, name: str) -> bool: ...
    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...
    @abstractmethod
    def stored_dtype(self, name: str) -> str: ...
    @abstractmethod
    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Any: ...
    @abstractmethod
    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def write(self, name: str, start: int, data: np.ndarray) -> None: ...

    def read_blob(self, name: str) -> bytes | None:
        """A byte array stored next to the cache's arrays (e.g. its tokenizer); None if absent."""
        if not self.has(name):
            return None
        return np.asarray(self.read(name), dtype=np.uint8).tobytes()

    def discard(self, name: str, start: int) -> None:  # noqa: B027 - optional hook
        """Drop the stored object holding row `start` of `name` before it is rewritten whole
        (a truncated zarr shard cannot be read-modified-written)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written so far durable (HDF5 needs it; zarr writes are atomic)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def abandon(self) -> None:
        """Drop the handles after a failed write without flushing anything more."""
        self.close()

    def size_bytes(self) -> int | None:
        """Bytes on disk / in the object store (None when the store cannot list sizes)."""
        return remote.size(self.path, self.storage_options)


def backend_class(name: str) -> type[ZarrBackend] | type[HDF5Backend]:
    return {"zarr": ZarrBackend, "hdf5": HDF5Backend}[infer_backend("", name)]


def open_backend(path: str, writable: bool, storage_options: dict | None = None) -> Backend:
    """Open an existing cache, telling zarr from HDF5 by what is there (not the suffix)."""
    path = local_path(os.fspath(path)).rstrip("/")
    h5file, group = split_hdf5(path)
    if is_remote(path):
        cls = HDF5Backend if h5file else ZarrBackend
        return cls(path, writable, storage_options)
    if h5file and group and os.path.isfile(h5file):
        return HDF5Backend(path, writable, storage_options)
    if not os.path.exists(path):
        raise KdcacheError(f"no cache at {path} (path does not exist)")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            raise KdcacheError(f"{path} is a directory but not a zarr cache (no zarr.json)")
        return ZarrBackend(path, writable, storage_options)
    return HDF5Backend(path, writable, storage_options)


def exists(path: str, storage_options: dict | None = None) -> bool:
    """Whether something is at a cache path or URL (before creating or deleting one)."""
    return remote.exists(split_hdf5(path)[0] or path, storage_options)


from kdcache.cache.hdf5_backend import HDF5Backend  # noqa: E402 - needs Backend above
from kdcache.cache.zarr_backend import ZarrBackend  # noqa: E402
