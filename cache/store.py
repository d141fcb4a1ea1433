"""Open, create, write, resume and merge caches; the chunk is the unit of work and checksums."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from cache import lock as lockmod
from cache import remote
from cache.backends import (
    Backend,
    ZarrBackend,
    backend_class,
    decode,
    exists,
    infer_backend,
    is_remote,
    local_path,
    open_backend,
)
from cache.errors import KdcacheError
from cache.meta import make_provenance, new_meta, read_meta
from cache.reader import MULTI, Cache, _first, chunk_digest
from cache.spec import CacheSpec, dataset_fingerprint, describe_diff

__all__ = [
    "chunk_digest", "create_cache", "make_provenance", "merge_shards", "new_meta", "open_cache",
    "open_members", "read_meta",
]  # fmt: skip

log = logging.getLogger(__name__)


class CacheWriter(Cache):
    """A cache opened for writing chunks; optionally holding the writer lock."""

    def __init__(self, backend: Backend, lock: lockmod.WriterLock | None) -> None:
        super().__init__(backend)
        self.lock = lock

    def todo_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        if not 0 <= rank < world_size:
            raise KdcacheError(f"rank {rank} out of range for world_size {world_size}")
        done = self.done()
        return [c for c in range(self.n_chunks) if not done[c] and c % world_size == rank]

    def write_chunk(
        self, c: int, logits: np.ndarray, view_params: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Validate everything, convert dense logits to the storage form (dtype, top-k,
        sampled), then write arrays, checksum, done flag; returns the stored arrays."""
        start, stop = self.chunk_range(c)
        n_c = stop - start
        logits = np.asarray(logits)
        view_params = np.asarray(view_params)
        want = (n_c, self.num_augs, self.num_classes)
        if logits.shape != want:
            raise KdcacheError(f"logits for chunk {c} have shape {logits.shape}; expected {want}")
        if not np.issubdtype(logits.dtype, np.floating):
            raise KdcacheError(f"logits have dtype {logits.dtype}; expected a float dtype")
        want_vp = (n_c, self.num_augs, self.spec.param_dim)
        if view_params.shape != want_vp:
            raise KdcacheError(
                f"view_params for chunk {c} have shape {view_params.shape}; expected {want_vp}"
            )
        for name, arr in (("logits", logits), ("view_params", view_params)):
            bad = ~np.isfinite(arr.reshape(n_c, -1)).all(axis=1)
            if bad.any():
                where = _first(np.flatnonzero(bad) + start)
                raise KdcacheError(
                    f"NaN/Inf in {name} of chunk {c} at samples {where}; nothing written"
                )
        arrays = self.codec.encode(np.asarray(logits, dtype=np.float32), start)
        for name in self.codec.value_names():
            vals = decode(arrays[name], self.dtype).reshape(n_c, -1)
            bad = ~np.isfinite(vals).all(axis=1)
            if bad.any():
                raise KdcacheError(
                    f"logits of chunk {c} overflow {self.dtype} at samples "
                    f"{_first(np.flatnonzero(bad) + start)}; use storage dtype float32 or bfloat16"
                )
        vp = np.ascontiguousarray(view_params, dtype=np.float32)
        digest = chunk_digest(*(arrays[k] for k in self.codec.names), vp)
        self.write_chunk_stored(c, arrays, vp, digest)
        return arrays

    def write_chunk_raw(self, c: int, raw: np.ndarray, vp: np.ndarray, digest: bytes) -> None:
        """Dense form of write_chunk_stored (the stored-dtype logits of chunk c)."""
        self.write_chunk_stored(c, {"logits": raw}, vp, digest)

    def write_chunk_stored(
        self, c: int, arrays: dict[str, np.ndarray], vp: np.ndarray, digest: bytes
    ) -> None:
        """Write validated stored arrays in the crash-safe order: arrays, checksum, done flag
        (used by write_chunk, merge, copy and convert)."""
        if self.attrs.get("complete"):
            raise KdcacheError(f"cache {self.path} is finalized; refusing to write chunk {c}")
        if set(arrays) != set(self.codec.names):
            raise KdcacheError(
                f"chunk {c} has arrays {sorted(arrays)}; cache {self.path} stores "
                f"{sorted(self.codec.names)}"
            )
        start, _stop = self.chunk_range(c)
        if self._chunk_done(c):  # rewriting: clear the flag first so a crash cannot leave it
            self._b.write("done", c, np.zeros(1, np.uint8))
            self._b.flush()
            for name in self.codec.names + ("view_params",):
                self._b.discard(name, start)
        for name in self.codec.names:
            self._b.write(name, start, arrays[name])
        self._b.write("view_params", start, vp)
        self._b.write("checksums", c, np.frombuffer(digest, np.uint8)[None, :])
        self._b.flush()
        self._b.write("done", c, np.ones(1, np.uint8))
        self._b.flush()

    def finalize(self, extra: dict | None = None) -> None:
        """Once all chunks are done: checksums + complete into attrs (written last), then
        release the lock. `extra` adds attrs (e.g. a conversion's KL report)."""
        meta = self.refresh()
        if not meta.get("complete"):
            miss = self.missing_chunks()
            if miss:
                raise KdcacheError(
                    f"cannot finalize {self.path}: {len(miss)} of {self.n_chunks} chunks not done "
                    f"{_first(miss)}"
                )
            sums = np.asarray(self._b.read("checksums"), dtype=np.uint8)
            meta["checksums"] = [bytes(row).hex() for row in sums]
            meta.update(extra or {})
            meta["complete"] = True
            meta["finalized_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._b.set_meta(meta)
            self._b.flush()
            self.attrs = meta
            log.info("finalized cache %s (%d chunks)", self.path, self.n_chunks)
        if self.lock is not None:
            self.lock.release()

    def close(self) -> None:
        super().close()
        if self.lock is not None:
            self.lock.release()


def open_cache(
    path: str,
    mode: str = "r",
    storage_options: dict | None = None,
    *,
    break_lock: bool = False,
) -> Cache:
    """Open an existing cache: mode "r" read-only (never writes, also for URLs), "a" writer
    holding the lock."""
    path = os.fspath(path)
    if mode == "r":
        return Cache(open_backend(path, False, storage_options))
    if mode not in ("a", "r+"):
        raise KdcacheError(f"unknown open mode {mode!r}; expected 'r' or 'a'")
    open_backend(path, False, storage_options).close()  # fail on non-caches before locking
    wlock = lockmod.acquire(path, break_lock=break_lock, storage_options=storage_options)
    try:
        return CacheWriter(open_backend(path, True, storage_options), wlock)
    except BaseException:
        wlock.release()
        raise


def open_members(path: str, storage_options: dict | None = None) -> list[Cache]:
    """The caches at `path`, read-only: one for a cache, every member of a multi-teacher
    store (in order)."""
    meta = read_meta(path, storage_options)
    if meta.get("kind") != MULTI:
        return [open_cache(path, storage_options=storage_options)]
    members = meta.get("members") or []
    if not meta.get("complete"):
        raise KdcacheError(f"multi-teacher store {path} is incomplete (its merge did not finish)")
    out: list[Cache] = []
    try:
        for m in members:
            out.append(open_cache(remote.join(path, m), storage_options=storage_options))
    except BaseException:
        for c in out:
            c.close()
        raise
    return out


def _check_inputs(spec: CacheSpec, labels: Any, keys: Sequence[str]) -> tuple[np.ndarray, list]:
    if not isinstance(spec, CacheSpec):
        raise KdcacheError(f"spec is {type(spec).__name__}; expected CacheSpec")
    labels = np.asarray(labels)
    if labels.shape != (spec.n,) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise KdcacheError(
            f"labels have shape {labels.shape} dtype {labels.dtype}; expected ({spec.n},) integers"
        )
    keys = list(keys)
    if len(keys) != spec.n or not all(isinstance(k, str) for k in keys):
        raise KdcacheError(f"keys must be {spec.n} strings; got {len(keys)} items")
    fp = spec.dataset.get("fingerprint")
    if fp is not None and dataset_fingerprint(keys, labels) != fp:
        raise KdcacheError("keys/labels do not match spec dataset.fingerprint")
    return labels.astype(np.int64), keys


def create_cache(
    path: str,
    spec: CacheSpec,
    *,
    labels: Any,
    keys: Sequence[str],
    overwrite: bool = False,
    provenance: dict | None = None,
    backend: str | None = None,
    lock: bool = True,
    storage_options: dict | None = None,
    break_lock: bool = False,
) -> CacheWriter:
    """Create a cache, or resume an incomplete one with an equal spec.

    overwrite=True deletes and recreates an existing cache, but only while holding the lock:
    lock=False writers (torchrun ranks > 0) join an existing equal-spec cache and never delete.
    """
    path = local_path(os.fspath(path)).rstrip("/")
    bname = infer_backend(path, backend)
    so = storage_options
    if is_remote(path):
        remote.require_writable(path)
        if bname == "hdf5":
            raise KdcacheError(
                f"HDF5 caches are written locally only; got {path} (use a .zarr URL, or write "
                "a local .h5 and `cache push` it)"
            )
    elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise KdcacheError(f"directory of {path} does not exist; create it first")
    labels, keys = _check_inputs(spec, labels, keys)
    if bname == "hdf5" and spec.compression == "zstd":
        raise KdcacheError("compression 'zstd' is not available for HDF5; use 'gzip' or 'none'")
    command = (provenance or {}).get("command")
    wlock = None
    if lock:
        wlock = lockmod.acquire(path, break_lock=break_lock, command=command, storage_options=so)
    try:
        for _attempt in range(3):
            if exists(path, so):
                writer = _existing(path, spec, bname, overwrite and lock, wlock, so)
                if writer is not None:
                    return writer
                log.warning("overwrite: deleting existing cache %s", path)
                backend_class(bname).delete(path, so)
                overwrite = False
            meta = new_meta(spec, provenance)
            if is_remote(path):  # no rename on object stores: arrays first, attrs last
                ZarrBackend.create(path, spec, meta, labels, keys, so)
                return CacheWriter(open_backend(path, True, so), wlock)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                backend_class(bname).create(tmp, spec, meta, labels, keys)
                if _publish(tmp, path, bname):
                    return CacheWriter(open_backend(path, True, so), wlock)
            finally:
                if os.path.exists(tmp):
                    backend_class(bname).delete(tmp)
            log.info("another process created %s first; joining it", path)
        raise KdcacheError(f"could not create {path}: it keeps changing under us")
    except BaseException:
        if wlock is not None:
            wlock.release()
        raise


def _existing(
    path: str, spec: CacheSpec, bname: str, may_delete: bool, wlock: Any, so: dict | None
) -> CacheWriter | None:
    """Resume the cache at `path` if its spec equals `spec`; None = delete it (may_delete)."""
    try:
        writer = CacheWriter(open_backend(path, True, so), wlock)
    except KdcacheError as e:
        if may_delete:
            return None
        raise KdcacheError(
            f"{path} exists but is not a usable cache ({e}); delete it first"
        ) from None
    if writer.backend_name != bname:
        writer._b.close()
        raise KdcacheError(f"{path} is a {writer.backend_name} cache, not {bname}")
    if writer.spec.to_json() == spec.to_json() and not may_delete:
        log.info("resuming cache %s: %d chunks to do", path, len(writer.todo_chunks()))
        return writer
    writer._b.close()
    if may_delete:
        return None
    hint = "; pass --overwrite to delete and recreate it" if wlock is not None else ""
    raise KdcacheError(
        f"cache {path} exists with a different spec ({describe_diff(writer.spec, spec)}){hint}"
    )


def _publish(tmp: str, path: str, bname: str) -> bool:
    """Move a fully laid-out cache into place; False if someone else got there first."""
    try:
        if bname == "hdf5":
            os.link(tmp, path)  # exclusive, unlike rename
        else:
            os.rename(tmp, path)  # a non-empty directory target makes this fail
        return True
    except OSError:
        if os.path.exists(path):
            return False
        raise


def shard_path(path: str, rank: int) -> str:
    """Where HDF5 rank `rank` writes its shard: cache.h5 -> cache.rank00001.h5."""
    root, ext = os.path.splitext(path.rstrip("/"))
    return f"{root}.rank{rank:05d}{ext}"


def merge_shards(
    out_path: str,
    shard_paths: Sequence[str],
    *,
    overwrite: bool = False,
    backend: str | None = None,
    break_lock: bool = False,
) -> str:
    """Join caches of the same spec whose done chunks are disjoint and cover all chunks."""
    from cache.merge import merge_shards as merge

    return merge(out_path, shard_paths, overwrite=overwrite, backend=backend, break_lock=break_lock)
