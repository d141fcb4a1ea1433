"""The zarr v3 backend: a directory or any fsspec URL, row arrays sharded per kdcache chunk."""

from __future__ import annotations

from typing import Any

import numpy as np
from kdcache.cache import remote
from kdcache.cache.backends import META_KEY, Backend, layout, row_arrays
from kdcache.cache.errors import KdcacheError
from kdcache.cache.remote import is_remote
from kdcache.cache.sparse import get_codec
from kdcache.cache.spec import CacheSpec


class ZarrBackend(Backend):
    """A zarr v3 group; row arrays sharded so one kdcache chunk is one object per array."""

    name = "zarr"

    def __init__(self, path: str, writable: bool, storage_options: dict | None = None) -> None:
        import zarr

        super().__init__(path, writable, storage_options)
        if writable:
            remote.require_writable(path)
        if is_remote(path):  # probe zarr.json first: the clearest errors for URLs
            fs, p = remote.filesystem(path, storage_options)
            try:
                fs.cat_file(remote.join(p, "zarr.json"))
            except FileNotFoundError:
                raise KdcacheError(f"no cache at {path} (no zarr.json there)") from None
            except Exception as e:  # noqa: BLE001
                raise remote.friendly(e, path) from None
        try:
            with remote.errors(path):
                store = _store(path, writable, storage_options)
                self.group = zarr.open_group(store, mode="r+" if writable else "r", zarr_format=3)
        except KdcacheError as e:
            if is_remote(path):
                raise
            raise KdcacheError(f"{path} is not a zarr v3 group ({e})") from None
        self.arrays: dict[str, Any] = {}

    def _arr(self, name: str) -> Any:
        if name not in self.arrays:
            try:
                self.arrays[name] = self.group[name]
            except KeyError:
                raise KdcacheError(f"cache {self.path} has no array {name!r}") from None
        return self.arrays[name]

    @classmethod
    def create(
        cls, path: str, spec: CacheSpec, meta: dict, labels: np.ndarray, keys: list[str],
        storage_options: dict | None = None, blobs: dict[str, bytes] | None = None,
    ) -> None:  # fmt: skip
        """Lay out a new store at `path` (which must not exist); the attrs are written last,
        so a half-created remote store is never taken for a cache."""
        import zarr
        from zarr.codecs import GzipCodec, ZstdCodec

        remote.require_writable(path)
        comp = {"none": None, "zstd": ZstdCodec(level=3), "gzip": GzipCodec(level=5)}
        with remote.errors(path):
            group = zarr.open_group(_store(path, True, storage_options), mode="w-", zarr_format=3)
            shard_rows = min(spec.chunk_samples, spec.n)
            rows = row_arrays(spec)
            for name, (shape, dtype, chunks) in layout(spec).items():
                kw: dict[str, Any] = {"compressors": None}
                if name != "keys":
                    kw["fill_value"] = -1 if name.endswith("_indices") else 0
                if name in rows:  # one shard = one kdcache chunk = one object
                    kw.update(compressors=comp[spec.compression], shards=(shard_rows,) + chunks[1:])
                arr = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, **kw)
                if name in get_codec(spec).value_names():
                    arr.attrs["kdcache_dtype"] = spec.dtype
            group["labels"][:] = labels
            group["keys"][:] = np.array(keys, dtype=object)
            for name, data in (blobs or {}).items():
                raw = np.frombuffer(data, np.uint8)
                arr = group.create_array(
                    name, shape=raw.shape, dtype=np.uint8, chunks=(max(1, raw.size),),
                    compressors=None, fill_value=0,
                )  # fmt: skip
                arr[:] = raw
            group.attrs[META_KEY] = meta

    @staticmethod
    def create_root(path: str, meta: dict, storage_options: dict | None = None) -> None:
        """A group holding only attrs (the root of a multi-teacher store)."""
        import zarr

        remote.require_writable(path)
        with remote.errors(path):
            group = zarr.open_group(_store(path, True, storage_options), mode="a", zarr_format=3)
            group.attrs[META_KEY] = meta

    def get_meta(self) -> dict:
        meta = self.group.attrs.get(META_KEY)
        if not isinstance(meta, dict):
            raise KdcacheError(f"{self.path} is a zarr group but not a kdcache cache (no attrs)")
        return meta

    def set_meta(self, meta: dict) -> None:
        with remote.errors(self.path):  # LocalStore writes zarr.json via temp + rename
            self.group.attrs[META_KEY] = meta

    def has(self, name: str) -> bool:
        return name in self.group

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

    def discard(self, name: str, start: int) -> None:
        from zarr.core.sync import sync

        arr = self._arr(name)
        rows = (arr.shards or arr.chunks)[0]
        key = arr.metadata.encode_chunk_key((start // rows,) + (0,) * (arr.ndim - 1))
        with remote.errors(self.path):
            sync(arr.store_path.store.delete(f"{arr.path}/{key}"))

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        with remote.errors(self.path):
            self._arr(name)[start : start + len(data)] = data

    @staticmethod
    def delete(path: str, storage_options: dict | None = None) -> None:
        remote.delete(path, storage_options)


def _store(path: str, writable: bool, storage_options: dict | None) -> Any:
    import zarr

    if is_remote(path):
        return zarr.storage.FsspecStore.from_url(
            path, storage_options=storage_options or None, read_only=not writable
        )
    return zarr.storage.LocalStore(path, read_only=not writable)
