"""Zarr v3 and HDF5 storage behind one small interface, with the same array names inside.

Backends move raw stored values (float16 / uint16 bfloat16 bits / float32) by row ranges;
dtype conversion, checksums and validation live in store.py so both backends behave alike.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from cache.errors import KdcacheError
from cache.spec import CacheSpec, canonical_json

log = logging.getLogger(__name__)

BACKENDS = ("zarr", "hdf5")
META_KEY = "kdcache"
INNER_CHUNK_BYTES = 1 << 20  # target size of a zarr inner chunk / HDF5 chunk of logits
STORED_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


# -- dtype codec (pure numpy: bfloat16 is stored as the high 16 bits of float32) -------------
def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float array -> stored dtype; bfloat16 rounds to nearest even."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):  # overflow to inf is reported by the caller
        return np.ascontiguousarray(values, dtype=STORED_DTYPES[dtype])


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """stored dtype -> float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw.astype(np.float32)


def infer_backend(path: str, backend: str | None = None) -> str:
    """Backend from an explicit name or the path suffix (.zarr, .h5/.hdf5)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise KdcacheError(f"unknown cache backend {backend!r}; expected one of {BACKENDS}")
        return backend
    low = path.rstrip("/").lower()
    if low.endswith(".zarr"):
        return "zarr"
    if low.endswith((".h5", ".hdf5")):
        return "hdf5"
    raise KdcacheError(
        f"cannot tell the backend of {path!r} from its suffix; expected .zarr, .h5 or .hdf5, "
        "or pass backend='zarr'|'hdf5'"
    )


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """file:///x -> /x; other paths unchanged."""
    return path[len("file://") :] if path.startswith("file://") else path


def _inner_rows(chunk_samples: int, row_bytes: int) -> int:
    """Largest divisor of chunk_samples whose rows fit INNER_CHUNK_BYTES (at least 1)."""
    target = max(1, INNER_CHUNK_BYTES // max(row_bytes, 1))
    return max(d for d in range(1, min(chunk_samples, target) + 1) if chunk_samples % d == 0)


def layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], Any, tuple[int, ...]]]:
    """name -> (shape, numpy dtype, chunk shape); keys use dtype str."""
    n, a, c, p = spec.n, spec.num_augs, spec.num_classes, spec.param_dim
    cs = min(spec.chunk_samples, n)
    item = np.dtype(STORED_DTYPES[spec.dtype]).itemsize
    inner = _inner_rows(cs, a * c * item)
    col = min(n, 1 << 20)
    return {
        "logits": ((n, a, c), STORED_DTYPES[spec.dtype], (inner, a, c)),
        "view_params": ((n, a, p), np.float32, (inner, a, max(p, 1))),
        "labels": ((n,), np.int64, (col,)),
        "keys": ((n,), str, (col,)),
        "done": ((spec.n_chunks,), np.uint8, (1,)),
        "checksums": ((spec.n_chunks, 32), np.uint8, (1, 32)),
    }


class Backend(ABC):
    """Raw access to one cache's arrays and its "kdcache" metadata."""

    name: str

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable

    @abstractmethod
    def get_meta(self) -> dict: ...
    @abstractmethod
    def set_meta(self, meta: dict) -> None: ...
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

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written so far durable (HDF5 needs it; zarr writes are atomic)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def size_bytes(self) -> int | None:
        """Bytes on disk (None for remote stores)."""
        if is_remote(self.path):
            return None
        if os.path.isfile(self.path):
            return os.path.getsize(self.path)
        total = 0
        for root, _dirs, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


class ZarrBackend(Backend):
    """A zarr v3 group; logits/view_params sharded so one kdcache chunk is one object."""

    name = "zarr"

    def __init__(self, path: str, writable: bool, storage_options: dict | None = None) -> None:
        import zarr

        super().__init__(path, writable)
        mode = "r+" if writable else "r"
        try:
            if is_remote(path):
                self.group = zarr.open_group(path, mode=mode, storage_options=storage_options)
            else:
                store = zarr.storage.LocalStore(path, read_only=not writable)
                self.group = zarr.open_group(store, mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises many types for "not a group here"
            raise KdcacheError(f"{path} is not a zarr v3 group ({type(e).__name__})") from None
        self.arrays: dict[str, Any] = {}

    def _arr(self, name: str) -> Any:
        if name not in self.arrays:
            try:
                self.arrays[name] = self.group[name]
            except KeyError:
                raise KdcacheError(f"cache {self.path} has no array {name!r}") from None
        return self.arrays[name]

    @classmethod
    def create(cls, path: str, spec: CacheSpec, meta: dict, labels: np.ndarray, keys: list[str]):
        """Lay out a new store at `path` (which must not exist)."""
        import zarr
        from zarr.codecs import GzipCodec, ZstdCodec

        comp = {"none": None, "zstd": ZstdCodec(level=3), "gzip": GzipCodec(level=5)}
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w-", zarr_format=3)
        shard_rows = min(spec.chunk_samples, spec.n)
        for name, (shape, dtype, chunks) in layout(spec).items():
            kw: dict[str, Any] = {"compressors": None}
            if name != "keys":
                kw["fill_value"] = 0
            if name in ("logits", "view_params"):  # one shard = one kdcache chunk = one object
                kw.update(compressors=comp[spec.compression], shards=(shard_rows,) + chunks[1:])
            arr = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, **kw)
            if name == "logits":
                arr.attrs["kdcache_dtype"] = spec.dtype
        group["labels"][:] = labels
        group["keys"][:] = np.array(keys, dtype=object)
        group.attrs[META_KEY] = meta

    def get_meta(self) -> dict:
        meta = self.group.attrs.get(META_KEY)
        if not isinstance(meta, dict):
            raise KdcacheError(f"{self.path} is a zarr group but not a kdcache cache (no attrs)")
        return meta

    def set_meta(self, meta: dict) -> None:
        self.group.attrs[META_KEY] = meta  # LocalStore writes zarr.json via temp + rename

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arr(name).shape)

    def stored_dtype(self, name: str) -> str:
        arr = self._arr(name)
        if name == "keys":
            return "str"
        return str(arr.attrs.get("kdcache_dtype", np.dtype(arr.dtype).name))

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Any:
        out = self._arr(name)[slice(start, stop)]
        return [str(k) for k in out.tolist()] if name == "keys" else out

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        arr = self._arr(name)
        sel = (rows,) + (slice(None),) * (arr.ndim - 1)
        return arr.get_orthogonal_selection(sel)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self._arr(name)[start : start + len(data)] = data

    @staticmethod
    def delete(path: str) -> None:
        shutil.rmtree(path)


class HDF5Backend(Backend):
    """One HDF5 file with chunked datasets; a single writer at a time."""

    name = "hdf5"

    def __init__(self, path: str, writable: bool, storage_options: dict | None = None) -> None:
        import h5py

        super().__init__(path, writable)
        if is_remote(path):
            raise KdcacheError(f"HDF5 caches must be local files; got {path}")
        if not h5py.is_hdf5(path):
            raise KdcacheError(f"{path} is not an HDF5 file")
        try:
            self.f = h5py.File(path, "r+" if writable else "r")
        except OSError as e:
            if "lock" in str(e).lower():
                raise KdcacheError(
                    f"HDF5 file {path} is open for writing by another process (HDF5 allows one "
                    "writer and no other openers meanwhile; ranks write shard files that "
                    "merge_shards joins)"
                ) from None
            raise KdcacheError(f"cannot open HDF5 file {path}: {e}") from None

    @classmethod
    def create(cls, path: str, spec: CacheSpec, meta: dict, labels: np.ndarray, keys: list[str]):
        import h5py

        if spec.compression == "zstd":
            raise KdcacheError("compression 'zstd' is not available for HDF5; use 'gzip' or 'none'")
        with h5py.File(path, "w-") as f:
            for name, (shape, dtype, chunks) in layout(spec).items():
                kw: dict[str, Any] = {"chunks": chunks if all(shape) else None}
                if name == "keys":
                    dtype = h5py.string_dtype("utf-8")
                if name in ("logits", "view_params") and spec.compression == "gzip":
                    kw.update(compression="gzip", compression_opts=4, shuffle=True)
                ds = f.create_dataset(name, shape=shape, dtype=dtype, fillvalue=None, **kw)
                if name == "logits":
                    ds.attrs["kdcache_dtype"] = spec.dtype
            f["labels"][:] = labels
            f["keys"][:] = np.array(keys, dtype=object)
            f.attrs[META_KEY] = canonical_json(meta)

    def get_meta(self) -> dict:
        raw = self.f.attrs.get(META_KEY)
        if raw is None:
            raise KdcacheError(f"{self.path} is an HDF5 file but not a kdcache cache (no attrs)")
        try:
            return json.loads(raw)
        except ValueError:
            raise KdcacheError(f"{self.path}: attrs 'kdcache' is not valid JSON") from None

    def set_meta(self, meta: dict) -> None:
        self.f.attrs[META_KEY] = canonical_json(meta)
        self.f.flush()

    def _ds(self, name: str) -> Any:
        if name not in self.f:
            raise KdcacheError(f"cache {self.path} has no array {name!r}")
        return self.f[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._ds(name).shape)

    def stored_dtype(self, name: str) -> str:
        ds = self._ds(name)
        if name == "keys":
            return "str"
        return str(ds.attrs.get("kdcache_dtype", ds.dtype.name))

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Any:
        ds = self._ds(name)
        if name == "keys":
            return list(ds.asstr()[slice(start, stop)])
        return ds[slice(start, stop)]

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self._ds(name)[np.asarray(rows, dtype=np.int64)]

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self._ds(name)[start : start + len(data)] = data

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    @staticmethod
    def delete(path: str) -> None:
        os.remove(path)


def backend_class(name: str) -> type[ZarrBackend] | type[HDF5Backend]:
    return {"zarr": ZarrBackend, "hdf5": HDF5Backend}[infer_backend("", name)]


def open_backend(path: str, writable: bool, storage_options: dict | None = None) -> Backend:
    """Open an existing cache, telling zarr from HDF5 by what is on disk (not the suffix)."""
    path = local_path(os.fspath(path))
    if is_remote(path):
        if path.rstrip("/").lower().endswith((".h5", ".hdf5")):
            raise KdcacheError(f"HDF5 caches must be local files; got {path}")
        return ZarrBackend(path, writable, storage_options)
    if not os.path.exists(path):
        raise KdcacheError(f"no cache at {path} (path does not exist)")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            raise KdcacheError(f"{path} is a directory but not a zarr cache (no zarr.json)")
        return ZarrBackend(path, writable, storage_options)
    return HDF5Backend(path, writable, storage_options)
