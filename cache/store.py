"""Open, create, write, resume and merge caches; the chunk is the unit of work and checksums."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from kdcache.cache import leftovers, remote, space
from kdcache.cache import lock as lockmod
from kdcache.cache.backends import (
    ZarrBackend,
    backend_class,
    exists,
    infer_backend,
    is_remote,
    local_path,
    open_backend,
)
from kdcache.cache.errors import KdcacheError
from kdcache.cache.meta import make_provenance, new_meta, read_meta
from kdcache.cache.reader import MULTI, Cache, chunk_digest
from kdcache.cache.spec import CacheSpec, dataset_fingerprint, describe_diff
from kdcache.cache.writer import CacheWriter

__all__ = [
    "chunk_digest", "create_cache", "make_provenance", "merge_shards", "new_meta", "open_cache",
    "open_members", "read_meta",
]  # fmt: skip

log = logging.getLogger(__name__)


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
        backend = open_backend(path, False, storage_options)
        if _kind(backend) == "tokens":  # a causal-LM cache: the token reader (cache/tokens.py)
            from kdcache.cache.tokens import TokenCache

            return TokenCache(backend)
        return Cache(backend)
    if mode not in ("a", "r+"):
        raise KdcacheError(f"unknown open mode {mode!r}; expected 'r' or 'a'")
    open_backend(path, False, storage_options).close()  # fail on non-caches before locking
    wlock = lockmod.acquire(path, break_lock=break_lock, storage_options=storage_options)
    try:
        return CacheWriter(open_backend(path, True, storage_options), wlock)
    except BaseException:
        wlock.release()
        raise


def _kind(backend) -> str | None:
    try:
        meta = backend.get_meta()
    except KdcacheError:
        return None
    return meta.get("kind") if isinstance(meta, dict) else None


def open_members(path: str, storage_options: dict | None = None, check: bool = True) -> list[Cache]:
    """The caches at `path`, read-only: one for a cache, every member of a multi-teacher
    store (in order). check=True runs the cheap structural checks (what training and copies
    rely on: shapes, stored dtypes, key)."""
    meta = read_meta(path, storage_options)
    if meta.get("kind") != MULTI:
        paths = [path]
    else:
        if not meta.get("complete"):
            raise KdcacheError(
                f"multi-teacher store {path} is incomplete (its merge did not finish)"
            )
        paths = [remote.join(path, m) for m in meta["members"]]
    out: list[Cache] = []
    try:
        for p in paths:
            out.append(open_cache(p, storage_options=storage_options))
            if check:
                out[-1].check_structure()
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


def make_parent(path: str) -> None:
    """Create the folder a local cache goes into (as precompute does for --out)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise KdcacheError(f"cannot create the directory of {path} ({e.strerror})") from None


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
    tokenizer: dict[str, bytes] | None = None,
) -> CacheWriter:
    """Create a cache, or resume an incomplete one with an equal spec.

    tokenizer: a text teacher's tokenizer files (name -> bytes), stored inside the cache.

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
    labels, keys = _check_inputs(spec, labels, keys)
    if bname == "hdf5" and spec.compression == "zstd":
        raise KdcacheError("compression 'zstd' is not available for HDF5; use 'gzip' or 'none'")
    if not is_remote(path):
        make_parent(path)  # after the inputs were checked: bad input creates no folder
    command = (provenance or {}).get("command")
    wlock = None
    if lock:
        wlock = lockmod.acquire(path, break_lock=break_lock, command=command, storage_options=so)
        leftovers.clean_cache(path)  # what a killed writer of this cache left
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
            blobs = {}
            if tokenizer:
                from kdcache.cache.blobs import TOKENIZER, pack_files

                blobs[TOKENIZER], meta["tokenizer"] = pack_files(tokenizer)
            if is_remote(path):  # no rename on object stores: arrays first, attrs last
                ZarrBackend.create(path, spec, meta, labels, keys, so, blobs=blobs)
                return CacheWriter(open_backend(path, True, so), wlock)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                try:
                    backend_class(bname).create(tmp, spec, meta, labels, keys, blobs=blobs)
                except OSError as e:
                    if space.is_enospc(e):
                        raise space.disk_full(path, "a new cache", "nothing was created") from None
                    raise
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
    from kdcache.cache.merge import merge_shards as merge

    return merge(out_path, shard_paths, overwrite=overwrite, backend=backend, break_lock=break_lock)
