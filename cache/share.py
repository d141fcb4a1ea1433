"""Sharing caches: push/pull (chunk-level, checksum-verified, resumable copies) and the
staged destinations that copy, merge and convert write to.

A local destination is built at `<name>.partial<ext>` and renamed into place when done, so an
error never leaves a half-written DST and rerunning resumes the partial copy. A remote
destination (zarr on s3:// etc.) is written in place, chunk arrays first and the attrs that
say "complete" last, so an interrupted push is never taken for a complete cache. Either way
the writer lock of DST is held throughout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from kdcache.cache import leftovers, remote
from kdcache.cache import lock as lockmod
from kdcache.cache.backends import backend_class, exists, infer_backend, open_backend
from kdcache.cache.errors import CacheCorruptError, KdcacheError
from kdcache.cache.reader import MULTI, Cache
from kdcache.cache.spec import CacheSpec, describe_diff
from kdcache.cache.store import (
    CacheWriter,
    make_parent,
    new_meta,
    open_cache,
    open_members,
    read_meta,
)
from tqdm import tqdm

log = logging.getLogger(__name__)


def partial_path(dst: str) -> str:
    """x/c.zarr -> x/c.partial.zarr (keeps the suffix, so the backend is still known)."""
    root, ext = os.path.splitext(dst.rstrip("/"))
    return f"{root}.partial{ext}"


class Destination:
    """The output of a copy, merge or convert; use as a context manager (holds the lock)."""

    def __init__(
        self, dst: str, storage_options: dict | None, break_lock: bool = False,
        command: str | None = None, overwrite: bool = False,
    ) -> None:  # fmt: skip
        self.dst = remote.local_path(os.fspath(dst)).rstrip("/")
        self.so = storage_options
        self.backend = infer_backend(self.dst)
        self.remote = remote.is_remote(self.dst)
        if self.remote:
            remote.require_writable(self.dst)
            if self.backend == "hdf5":
                raise KdcacheError(
                    f"HDF5 caches are written locally only; got {self.dst} (use a .zarr URL: "
                    "the same bytes, chunk by chunk)"
                )
        else:  # its folder is made as precompute makes --out's (pull ... local/r34.h5)
            make_parent(self.dst)
        self.lock = lockmod.acquire(
            self.dst, break_lock=break_lock, command=command, storage_options=self.so
        )
        self.replace = False
        try:
            self.exists = exists(self.dst, self.so)
            if self.exists and overwrite:
                if self.remote:  # no rename on object stores: clear it first
                    log.warning("overwrite: deleting %s", self.dst)
                    backend_class(self.backend).delete(self.dst, self.so)
                    self.exists = False
                else:  # build next to it, swap at publish()
                    self.exists, self.replace = False, True
        except BaseException:
            self.lock.release()
            raise
        self.work = self.dst if (self.remote or self.exists) else partial_path(self.dst)
        leftovers.zarr_partials(self.work)  # we hold the lock: a killed copy's temporaries

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    def path(self, member: str | None) -> str:
        return self.work if member is None else remote.join(self.work, member)

    def publish(self) -> None:
        """Move a finished local build into place (replacing DST only now, with overwrite)."""
        if self.work != self.dst:
            if self.replace:
                log.warning("overwrite: replacing %s", self.dst)
                backend_class(self.backend).delete(self.dst)
            os.rename(self.work, self.dst)
            log.info("published %s", self.dst)


def for_backend(spec: CacheSpec, backend: str) -> CacheSpec:
    """The spec a copy gets in `backend`: zstd is zarr-only, so HDF5 copies use gzip (a
    layout-only change: the key, the stored values and the checksums stay the same)."""
    if backend != "hdf5" or spec.compression != "zstd":
        return spec
    d = spec.to_dict()
    d["storage"]["compression"] = "gzip"
    return CacheSpec.from_dict(d)


def open_target(
    path: str, spec: CacheSpec, src: Cache, *, backend: str, so: dict | None,
    provenance: dict | None = None, discard_other: bool = False,
) -> CacheWriter:  # fmt: skip
    """Resume the cache at `path` when it holds `spec`, else create it (labels/keys from
    `src`). The caller holds the destination's lock."""
    if _present(path, so):
        try:
            w = CacheWriter(open_backend(path, True, so), None)
        except KdcacheError as e:
            if not discard_other:
                raise KdcacheError(
                    f"{path} exists but is not a kdcache cache ({e}); refusing to overwrite it"
                ) from None
            w = None
        if w is not None:
            if w.spec.to_json() == spec.to_json():
                return w
            diff = describe_diff(w.spec, spec)
            w._b.close()
            if not discard_other:
                raise KdcacheError(
                    f"{path} holds a different cache ({diff}); refusing to overwrite it"
                )
        log.warning("discarding the stale partial output %s", path)
        backend_class(backend).delete(path, so)
    prov = src.attrs.get("provenance") if provenance is None else provenance
    meta = new_meta(spec, prov)
    blobs = src.blobs()  # verified: a copy is as self-contained as its source
    if src.attrs.get("tokenizer") is not None:
        meta["tokenizer"] = src.attrs["tokenizer"]
    backend_class(backend).create(path, spec, meta, src.labels(), src.keys(), so, blobs=blobs)
    return CacheWriter(open_backend(path, True, so), None)


def _present(path: str, so: dict | None) -> bool:
    file, group = remote.split_hdf5(path)
    if group is None:
        return exists(path, so)
    if not exists(file, so):
        return False
    import h5py

    with h5py.File(file, "r") as f:
        return group in f


def unfinalize(w: CacheWriter) -> None:
    """Reopen a finalized cache for repairs: complete=False until finalize() again."""
    if w.is_complete():
        meta = {**w.attrs, "complete": False, "checksums": None}
        w._b.set_meta(meta)
        w.attrs = meta
        w._done_cache = None


def chunk_bytes(cache: Cache, c: int) -> int:
    start, stop = cache.chunk_range(c)
    return (stop - start) * cache.num_augs * (cache.entry_bytes() + 4 * cache.spec.param_dim)


def copy_chunks(
    src: Cache, w: CacheWriter, bar: Any = None, verify_existing: bool | None = None
) -> tuple[int, int]:
    """Copy src's done chunks that `w` lacks or holds bad; (copied, kept). Existing chunks are
    read back and checked when local (or verify_existing); on object stores a matching
    recorded checksum suffices (a chunk object is written whole before its checksum)."""
    if verify_existing is None:
        verify_existing = not remote.is_remote(w.path)
    have = np.asarray(w._b.read("done")).astype(bool)
    todo, kept = [], 0
    for c in (int(c) for c in np.flatnonzero(src.done())):
        if have[c] and w.checksum(c) == src.checksum(c):
            try:
                if verify_existing:
                    w.read_chunk_verified(c)
                kept += 1
                if bar is not None:
                    bar.update(chunk_bytes(src, c))
                continue
            except CacheCorruptError as e:
                log.warning("%s; copying it again", e)
        todo.append(c)
    if todo:
        unfinalize(w)
    for c in todo:
        arrays, vp = src.read_chunk_verified(c)
        w.write_chunk_stored(c, arrays, vp, src.checksum(c))
        if bar is not None:
            bar.update(chunk_bytes(src, c))
    return len(todo), kept


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
        disable=not enabled, dynamic_ncols=True, leave=False,
    )  # fmt: skip


def _check_same_dst(d: Destination, sources: list[Cache], members: list, meta: dict) -> None:
    """Refuse a DST that holds something else than SRC."""
    try:
        dmeta = read_meta(d.dst, d.so)
    except KdcacheError as e:
        raise KdcacheError(
            f"{d.dst} exists but is not a kdcache cache ({e}); refusing to overwrite it"
        ) from None
    if (dmeta.get("kind") == MULTI) != (meta.get("kind") == MULTI):
        raise KdcacheError(
            f"{d.dst} holds a different {'store' if dmeta.get('kind') else 'cache'} than the "
            "source; refusing to overwrite it"
        )
    if dmeta.get("kind") == MULTI and dmeta.get("members") != members:
        raise KdcacheError(
            f"{d.dst} is a multi-teacher store with members {dmeta.get('members')}, not "
            f"{members}; refusing to overwrite it"
        )
    for m, s in zip(members, sources, strict=True):
        want = for_backend(s.spec, d.backend)
        with open_cache(d.path(m), storage_options=d.so) as have:
            if have.spec.to_json() != want.to_json():
                raise KdcacheError(
                    f"{d.dst} holds a different cache ({describe_diff(have.spec, want)}); "
                    "refusing to overwrite it"
                )


def copy_cache(
    src: str, dst: str, *, storage_options: dict | None = None, break_lock: bool = False,
    progress: bool = True, command: str | None = None, verify_existing: bool | None = None,
) -> dict:  # fmt: skip
    """`cache push` / `cache pull`: copy SRC to DST chunk by chunk (any backends, any URLs),
    verifying every chunk against its checksum; rerun to resume or repair."""
    meta = read_meta(src, storage_options)
    if meta.get("kind") == "tokens":
        from kdcache.cache.tokencopy import copy_token_cache

        return copy_token_cache(src, dst, storage_options=storage_options, break_lock=break_lock)
    multi = meta.get("kind") == MULTI
    members: list = list(meta.get("members") or []) if multi else [None]
    sources = open_members(src, storage_options)
    copied = kept = 0
    try:
        with Destination(dst, storage_options, break_lock, command) as d:
            if d.exists:
                _check_same_dst(d, sources, members, meta)
            total = sum(chunk_bytes(s, c) for s in sources for c in np.flatnonzero(s.done()))
            with progress_bar(total, f"copy {os.path.basename(d.dst)}", progress) as bar:
                for m, s in zip(members, sources, strict=True):
                    w = open_target(
                        d.path(m), for_backend(s.spec, d.backend), s, backend=d.backend, so=d.so,
                        discard_other=d.work != d.dst,
                    )  # fmt: skip
                    try:
                        n_new, n_kept = copy_chunks(s, w, bar, verify_existing)
                        copied, kept = copied + n_new, kept + n_kept
                        if s.is_complete() and not w.is_complete():
                            w.finalize()
                    finally:
                        w.close()
            if multi:
                backend_class(d.backend).create_root(d.work, meta, d.so)
            d.publish()
            complete = all(s.is_complete() for s in sources)
    finally:
        for s in sources:
            s.close()
    log.info("copied %d chunks, kept %d, %s -> %s", copied, kept, src, dst)
    return {"src": src, "dst": dst, "copied_chunks": copied, "kept_chunks": kept,
            "bytes": total, "complete": complete}  # fmt: skip
