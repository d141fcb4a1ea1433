"""Open, create, write, resume and merge caches; the chunk is the unit of work and checksums."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from cache import lock as lockmod
from cache.backends import (
    Backend,
    backend_class,
    decode,
    encode,
    infer_backend,
    is_remote,
    local_path,
    open_backend,
)
from cache.errors import CacheCorruptError, KdcacheError
from cache.reader import Cache, _first
from cache.spec import FORMAT_VERSION, CacheSpec, dataset_fingerprint, describe_diff

log = logging.getLogger(__name__)


def chunk_digest(logits_raw: np.ndarray, view_params: np.ndarray) -> bytes:
    """sha256 of a chunk's stored logits bytes then view_params bytes (little-endian, C order)."""
    h = hashlib.sha256()
    for arr in (logits_raw, view_params):
        h.update(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return h.digest()


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

    def write_chunk(self, c: int, logits: np.ndarray, view_params: np.ndarray) -> None:
        """Validate everything, then write arrays, then the checksum, then the done flag."""
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
        raw = encode(logits, self.dtype)
        bad = ~np.isfinite(decode(raw, self.dtype).reshape(n_c, -1)).all(axis=1)
        if bad.any():
            raise KdcacheError(
                f"logits of chunk {c} overflow {self.dtype} at samples "
                f"{_first(np.flatnonzero(bad) + start)}; use storage dtype float32 or bfloat16"
            )
        vp = np.ascontiguousarray(view_params, dtype=np.float32)
        self.write_chunk_raw(c, raw, vp, chunk_digest(raw, vp))

    def write_chunk_raw(self, c: int, raw: np.ndarray, vp: np.ndarray, digest: bytes) -> None:
        """Write validated stored-dtype arrays in the crash-safe order (used by merge too)."""
        if self.attrs.get("complete"):
            raise KdcacheError(f"cache {self.path} is finalized; refusing to write chunk {c}")
        start, _stop = self.chunk_range(c)
        if self._chunk_done(c):  # rewriting: clear the flag first so a crash cannot leave it
            self._b.write("done", c, np.zeros(1, np.uint8))
            self._b.flush()
        self._b.write("logits", start, raw)
        self._b.write("view_params", start, vp)
        self._b.write("checksums", c, np.frombuffer(digest, np.uint8)[None, :])
        self._b.flush()
        self._b.write("done", c, np.ones(1, np.uint8))
        self._b.flush()

    def finalize(self) -> None:
        """Once all chunks are done: checksums + complete into attrs, then release the lock."""
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


def make_provenance(extra: dict | None = None) -> dict:
    """Versions and time of creation; stored in attrs, never hashed into the key."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str, default: str = "unknown") -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return default

    out = {
        "kdcache": ver("kdcache", "0.1.0"),
        "numpy": np.__version__,
        "zarr": ver("zarr"),
        "h5py": ver("h5py"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {**out, **(extra or {})}


def open_cache(
    path: str,
    mode: str = "r",
    storage_options: dict | None = None,
    *,
    break_lock: bool = False,
) -> Cache:
    """Open an existing cache: mode "r" read-only, "a" writer holding the lock."""
    path = os.fspath(path)
    if mode == "r":
        return Cache(open_backend(path, False, storage_options))
    if mode not in ("a", "r+"):
        raise KdcacheError(f"unknown open mode {mode!r}; expected 'r' or 'a'")
    open_backend(path, False, storage_options).close()  # fail on non-caches before locking
    wlock = lockmod.acquire(path, break_lock=break_lock)
    try:
        return CacheWriter(open_backend(path, True, storage_options), wlock)
    except BaseException:
        wlock.release()
        raise


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
    if is_remote(path):
        raise KdcacheError(f"writing to remote {path} is not supported; write locally and push")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise KdcacheError(f"directory of {path} does not exist; create it first")
    labels, keys = _check_inputs(spec, labels, keys)
    if bname == "hdf5" and spec.compression == "zstd":
        raise KdcacheError("compression 'zstd' is not available for HDF5; use 'gzip' or 'none'")
    command = (provenance or {}).get("command")
    wlock = lockmod.acquire(path, break_lock=break_lock, command=command) if lock else None
    try:
        for _attempt in range(3):
            if os.path.exists(path):
                writer = CacheWriter(open_backend(path, True, storage_options), wlock)
                if writer.backend_name != bname:
                    writer._b.close()
                    raise KdcacheError(f"{path} is a {writer.backend_name} cache, not {bname}")
                same = writer.spec.to_json() == spec.to_json()
                if same and not (overwrite and lock):
                    log.info("resuming cache %s: %d chunks to do", path, len(writer.todo_chunks()))
                    return writer
                writer._b.close()
                if not (overwrite and lock):
                    hint = "; pass overwrite=True to delete and recreate it" if lock else ""
                    raise KdcacheError(
                        f"cache {path} exists with a different spec "
                        f"({describe_diff(writer.spec, spec)}){hint}"
                    )
                log.warning("overwrite: deleting existing cache %s", path)
                backend_class(bname).delete(path)
                overwrite = False
            meta = {
                "format_version": FORMAT_VERSION,
                "spec": spec.to_dict(),
                "key": spec.key(),
                "counts": {
                    "n": spec.n,
                    "num_augs": spec.num_augs,
                    "num_classes": spec.num_classes,
                    "n_chunks": spec.n_chunks,
                },
                "provenance": make_provenance(provenance),
                "complete": False,
                "checksums": None,
            }
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                backend_class(bname).create(tmp, spec, meta, labels, keys)
                if _publish(tmp, path, bname):
                    return CacheWriter(open_backend(path, True, storage_options), wlock)
            finally:
                if os.path.exists(tmp):
                    backend_class(bname).delete(tmp)
            log.info("another process created %s first; joining it", path)
        raise KdcacheError(f"could not create {path}: it keeps changing under us")
    except BaseException:
        if wlock is not None:
            wlock.release()
        raise


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
    if not shard_paths:
        raise KdcacheError("merge_shards needs at least one shard")
    shards = [open_cache(p) for p in shard_paths]
    try:
        base = shards[0]
        owner: dict[int, int] = {}
        for i, sh in enumerate(shards):
            if os.path.abspath(sh.path) == os.path.abspath(out_path):
                raise KdcacheError(f"merge output {out_path} is also a shard")
            names = [d for d in sh.spec.diff(base.spec) if d != "storage.compression"]
            if names:
                raise KdcacheError(
                    f"shard {sh.path} has a different spec than {base.path}: "
                    f"{describe_diff(sh.spec, base.spec)}"
                )
            for c in np.flatnonzero(sh.done()):
                if int(c) in owner:
                    raise KdcacheError(
                        f"chunk {c} is done in both {shards[owner[int(c)]].path} and {sh.path}"
                    )
                owner[int(c)] = i
        missing = [c for c in range(base.n_chunks) if c not in owner]
        if missing:
            raise KdcacheError(f"no shard has chunks {_first(missing)} of {base.n_chunks}")
        writer = create_cache(
            out_path, base.spec, labels=base.labels(), keys=base.keys(), overwrite=overwrite,
            provenance={"merged_from": [str(p) for p in shard_paths]}, backend=backend,
            break_lock=break_lock,
        )  # fmt: skip
        try:
            for c in writer.todo_chunks():
                sh = shards[owner[c]]
                start, stop = sh.chunk_range(c)
                raw = sh.read_chunk_raw(c)
                vp = np.asarray(sh._b.read("view_params", start, stop), dtype=np.float32)
                digest = chunk_digest(raw, vp)
                if digest != bytes(np.asarray(sh._b.read("checksums", c, c + 1))[0]):
                    raise CacheCorruptError(f"chunk {c} of shard {sh.path} fails its checksum")
                writer.write_chunk_raw(c, raw, vp, digest)
            writer.finalize()
        finally:
            writer.close()
    finally:
        for sh in shards:
            sh.close()
    return out_path
