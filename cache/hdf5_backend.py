"""The HDF5 backend: one local file (or a group of it); read remotely via fsspec files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Any

import numpy as np
from kdcache.cache import remote
from kdcache.cache.backends import META_KEY, Backend, layout, row_arrays
from kdcache.cache.errors import CacheCorruptError, CacheLockedError, KdcacheError
from kdcache.cache.remote import is_remote, split_hdf5
from kdcache.cache.sparse import get_codec
from kdcache.cache.spec import CacheSpec, canonical_json


def open_error(file: str, e: OSError) -> KdcacheError:
    """Tell a lock held by another process from a damaged file: only errno EAGAIN/EWOULDBLOCK
    ("unable to lock file") is a lock; "bad ... superblock" merely contains the letters."""
    msg = str(e)
    detail = msg[msg.find("(") + 1 : msg.rfind(")")] if "(" in msg else msg
    if isinstance(e, BlockingIOError) or "unable to lock file" in msg:
        return CacheLockedError(
            f"HDF5 file {file} is open for writing by another process (HDF5 allows one writer "
            "and no other openers meanwhile; ranks write shard files that merge_shards joins)"
        )
    if "truncated file" in msg:
        return CacheCorruptError(
            f"HDF5 file {file} is truncated ({detail}); an interrupted copy? pull/copy it again"
        )
    if "signature" in msg and "not found" in msg:
        return KdcacheError(f"{file} is not an HDF5 file ({detail})")
    return CacheCorruptError(
        f"HDF5 file {file} is corrupt ({detail}); pull/copy it again, or delete it and rerun"
    )


class HDF5Backend(Backend):
    """One HDF5 file (or a group of it) with chunked datasets; a single writer at a time."""

    name = "hdf5"

    def __init__(self, path: str, writable: bool, storage_options: dict | None = None) -> None:
        import h5py

        super().__init__(path, writable, storage_options)
        file, group = split_hdf5(path)
        file = file or path
        self._fobj = None
        if is_remote(path):
            if writable:
                raise KdcacheError(
                    f"HDF5 caches are written locally only; got {path} (write a local .h5 and "
                    "push it, or use a .zarr URL)"
                )
            fs, p = remote.filesystem(file, storage_options)
            with remote.errors(file):
                self._fobj = fs.open(p, "rb", block_size=1 << 22)
            try:
                self.f = h5py.File(self._fobj, "r")
            except OSError as e:
                self._fobj.close()
                raise open_error(file, e) from None
        else:
            if not h5py.is_hdf5(file):
                raise KdcacheError(f"{file} is not an HDF5 file")
            try:
                self.f = h5py.File(file, "r+" if writable else "r")
            except OSError as e:
                raise open_error(file, e) from None
        self.root = self.f
        self._dsets: dict[str, Any] = {}
        if group is not None:
            if group not in self.f:
                self.close()
                raise KdcacheError(f"HDF5 file {file} has no member {group!r}")
            self.root = self.f[group]

    @classmethod
    def create(
        cls, path: str, spec: CacheSpec, meta: dict, labels: np.ndarray, keys: list[str],
        storage_options: dict | None = None, blobs: dict[str, bytes] | None = None,
    ) -> None:  # fmt: skip
        import h5py

        if spec.compression == "zstd":
            raise KdcacheError("compression 'zstd' is not available for HDF5; use 'gzip' or 'none'")
        file, group = split_hdf5(path)
        file = file or path
        if is_remote(file):
            raise KdcacheError(f"HDF5 caches are written locally only; got {path}")
        rows = row_arrays(spec)
        values = get_codec(spec).value_names()
        with h5py.File(file, "a" if group else "w-") as f:
            root = f.create_group(group) if group else f
            for name, (shape, dtype, chunks) in layout(spec).items():
                kw: dict[str, Any] = {"chunks": chunks if all(shape) else None}
                if name == "keys":
                    dtype = h5py.string_dtype("utf-8")
                if name in rows and spec.compression == "gzip":
                    kw.update(compression="gzip", compression_opts=4, shuffle=True)
                if name.endswith("_indices"):
                    kw["fillvalue"] = -1
                ds = root.create_dataset(name, shape=shape, dtype=dtype, **kw)
                if name in values:
                    ds.attrs["kdcache_dtype"] = spec.dtype
            root["labels"][:] = labels
            root["keys"][:] = np.array(keys, dtype=object)
            for name, data in (blobs or {}).items():
                root.create_dataset(name, data=np.frombuffer(data, np.uint8))
            root.attrs[META_KEY] = canonical_json(meta)

    @staticmethod
    def create_root(path: str, meta: dict, storage_options: dict | None = None) -> None:
        import h5py

        with h5py.File(path, "a") as f:
            f.attrs[META_KEY] = canonical_json(meta)

    def get_meta(self) -> dict:
        raw = self.root.attrs.get(META_KEY)
        if raw is None:
            raise KdcacheError(f"{self.path} is an HDF5 file but not a kdcache cache (no attrs)")
        try:
            return json.loads(raw)
        except ValueError:
            raise KdcacheError(f"{self.path}: attrs 'kdcache' is not valid JSON") from None

    def set_meta(self, meta: dict) -> None:
        self.root.attrs[META_KEY] = canonical_json(meta)
        self.f.flush()

    def _ds(self, name: str) -> Any:
        """Datasets stay open: closing one flushes its chunk cache, and h5py reports errors of
        that (a full disk) only as ignored exceptions, while flush() raises them."""
        ds = self._dsets.get(name)
        if ds is None:
            if name not in self.root:
                raise KdcacheError(f"cache {self.path} has no array {name!r}")
            ds = self._dsets[name] = self.root[name]
        return ds

    def has(self, name: str) -> bool:
        return name in self.root

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
        if self.writable and self._fobj is None:  # HDF5 may report a failed write only later
            size = os.fstat(self.f.id.get_vfd_handle()).st_size
            if size < self.f.id.get_filesize():
                raise OSError(errno.ENOSPC, f"{self.path} is shorter than HDF5 wrote it")

    def abandon(self) -> None:
        """After a failed write HDF5 still holds dirty metadata that closing would write into
        a full disk, tearing what was consistent: point the file descriptor at /dev/null
        first, so the file keeps the state of its last successful flush."""
        if self.writable and self._fobj is None and self.f.id.valid:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, self.f.id.get_vfd_handle())
                os.close(null)
            except OSError:
                pass
            self._dsets.clear()
            with contextlib.suppress(Exception):
                self.f.close()
            return
        self.close()

    def close(self) -> None:
        self._dsets.clear()
        if self.f.id.valid:
            self.f.close()
        if self._fobj is not None:
            self._fobj.close()

    def size_bytes(self) -> int | None:
        return remote.size(split_hdf5(self.path)[0] or self.path, self.storage_options)

    @staticmethod
    def delete(path: str, storage_options: dict | None = None) -> None:
        remote.delete(split_hdf5(path)[0] or path, storage_options)
