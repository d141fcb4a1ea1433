"""push / pull / convert / merge for token caches: copy done chunks verified against their
checksums into a cache of the same spec (another backend, URL or compression), resumable."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from kdcache.cache.errors import KdcacheError
from kdcache.cache.tokens import TokenCache, TokenWriter, open_token_cache
from kdcache.cache.tokenstore import create_token_cache

log = logging.getLogger(__name__)


def _target(src: TokenCache, dst: str, so, break_lock: bool, overwrite: bool,
            compression: str | None = None) -> TokenWriter:  # fmt: skip
    spec = dict(src.spec)
    if compression is not None:
        spec["storage"] = {**spec["storage"], "compression": compression}
    prov = {"copied_from": src.path}
    return create_token_cache(
        dst, spec, keys=src.keys, lengths=src.lengths, tokenizer=src.tokenizer_files(),
        provenance=prov, overwrite=overwrite, break_lock=break_lock, storage_options=so,
    )  # fmt: skip


def _copy_done(src: TokenCache, w: TokenWriter, verify_existing: bool = True) -> tuple[int, int]:
    """Copy src's done chunks that w lacks (or fails to verify); returns (copied, kept)."""
    have = w.done()
    copied = kept = 0
    for c in np.flatnonzero(src.done()):
        if have[c] and (not verify_existing or _ok(w, int(c))):
            kept += 1
            continue
        raw = src.read_chunk_stored(int(c), verify=True)
        w.write_chunk_stored(int(c), raw)
        copied += 1
    return copied, kept


def _ok(w: TokenWriter, c: int) -> bool:
    try:
        w.read_chunk_stored(c, verify=True)
        return True
    except KdcacheError:
        return False


def copy_token_cache(
    src: str, dst: str, *, storage_options: dict | None = None, break_lock: bool = False,
    overwrite: bool = False, compression: str | None = None,
) -> dict:  # fmt: skip
    """`cache push/pull/convert` of a token cache (backend by the DST suffix)."""
    s = open_token_cache(src, storage_options, allow_incomplete=True)
    try:
        w = _target(s, dst, storage_options, break_lock, overwrite, compression)
        try:
            copied, kept = _copy_done(s, w)
            complete = s.is_complete()
            extra = {k: s.attrs[k] for k in ("kl_sample",) if k in s.attrs}
            if complete:
                w.finalize(extra)
        finally:
            w.close()
    finally:
        s.close()
    return {"src": src, "dst": dst, "copied_chunks": copied, "kept_chunks": kept,
            "complete": complete, "bytes": None}  # fmt: skip


def merge_token_shards(
    out: str, inputs: Sequence[str], *, storage_options: dict | None = None,
    overwrite: bool = False, break_lock: bool = False,
) -> dict:  # fmt: skip
    """Join partial token caches of one spec (e.g. `--shard I/N` runs) into `out`."""
    srcs = [open_token_cache(p, storage_options, allow_incomplete=True) for p in inputs]
    try:
        first = srcs[0]
        for p, s in zip(inputs, srcs, strict=True):
            if s.key != first.key:
                raise KdcacheError(
                    f"cannot merge {p}: its key {s.key[:12]} differs from {inputs[0]}'s "
                    f"{first.key[:12]} (token caches merge only as shards of one spec)"
                )
        w = _target(first, out, storage_options, break_lock, overwrite)
        try:
            copied = 0
            for s in srcs:
                copied += _copy_done(s, w)[0]
            missing = w.missing_chunks()
            if not missing:
                w.finalize()
        finally:
            w.close()
    finally:
        for s in srcs:
            s.close()
    return {"out": out, "copied_chunks": copied, "missing_chunks": missing,
            "complete": not missing, "teachers": [], "members": []}  # fmt: skip


def verify_token_cache(path: str, storage_options: dict | None = None) -> list[str]:
    """`cache verify` of a token cache: problems (empty: sound)."""
    with open_token_cache(path, storage_options, allow_incomplete=True) as c:
        problems = list(c.verify()["problems"])
        done = np.asarray(c._b.read("done")).astype(bool)
        if c.is_complete() and not done.all():
            problems.append("attrs say complete but some chunks are not done")
        if done.all() and not c.is_complete():
            problems.append("all chunks done but the cache was never finalized")
        try:
            c.tokenizer_files()
        except KdcacheError as e:
            problems.append(str(e))
    return problems
