"""Check a cache end to end: completeness, checksums, NaN/Inf, shapes/dtypes, attrs, replay.

A multi-teacher store is checked member by member (problems prefixed with the member).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from kdcache.cache import remote
from kdcache.cache.dtypes import decode
from kdcache.cache.errors import AttrsError, CacheCorruptError
from kdcache.cache.reader import MULTI, Cache
from kdcache.cache.spec import dataset_fingerprint
from kdcache.cache.store import chunk_digest, open_cache, read_meta

log = logging.getLogger(__name__)

ReplayCheck = Callable[[Cache], list[str]]


def _short(idx: list[int], k: int = 8) -> str:
    idx = [int(i) for i in idx]
    return f"{idx[:k]}" + (f" (+{len(idx) - k} more)" if len(idx) > k else "")


def _check_chunks(cache: Cache, sums: np.ndarray, done: np.ndarray) -> list[str]:
    problems = []
    names = cache.codec.names
    for c in np.flatnonzero(done):
        start, stop = cache.chunk_range(int(c))
        where = f"chunk {c} (samples {start}..{stop - 1})"
        try:
            arrays = cache._read_names(int(c), names + ("view_params",))
        except CacheCorruptError:
            problems.append(f"{where}: unreadable (truncated or corrupt data)")
            continue
        vp = arrays.pop("view_params").astype(np.float32, copy=False)
        if chunk_digest(*(arrays[k] for k in names), vp) != bytes(sums[c]):
            problems.append(f"{where}: checksum mismatch (data corrupted)")
        bad = np.zeros(stop - start, dtype=bool)
        for name in cache.codec.value_names():
            v = decode(arrays[name], cache.dtype).reshape(stop - start, -1)
            bad |= ~np.isfinite(v).all(axis=1)
        if bad.any():
            problems.append(
                f"{where}: NaN/Inf logits at samples {_short(list(start + np.flatnonzero(bad)))}"
            )
    return problems


def _verify_one(cache: Cache) -> list[str]:
    problems = cache.structure_problems()
    meta = cache.attrs
    if problems:  # arrays do not match the spec: chunk checks would only add noise
        return problems
    done = np.asarray(cache._b.read("done")).astype(bool)  # the array itself, not the attrs
    missing = [int(c) for c in np.flatnonzero(~done)]
    if missing:
        problems.append(
            f"incomplete: {len(missing)} of {cache.n_chunks} chunks not done: {_short(missing)}"
        )
        if meta.get("complete"):
            problems.append("attrs say complete but some chunks are not done")
    elif not meta.get("complete"):
        problems.append("all chunks done but the cache was never finalized")
    sums = np.asarray(cache._b.read("checksums"), dtype=np.uint8)
    if meta.get("complete"):
        listed = meta.get("checksums") or []
        if len(listed) != cache.n_chunks:
            problems.append(f"attrs list {len(listed)} checksums; expected {cache.n_chunks}")
        else:
            diff = [c for c in range(cache.n_chunks) if listed[c] != bytes(sums[c]).hex()]
            if diff:
                problems.append(
                    f"attrs checksums differ from the checksums array at chunks {_short(diff)}"
                )
    problems += _check_chunks(cache, sums, done)
    try:
        cache.blobs()
    except CacheCorruptError as e:
        problems.append(str(e))
    labels, keys = cache.labels(), cache.keys()
    fp = cache.spec.dataset.get("fingerprint")
    if fp is not None and dataset_fingerprint(keys, labels) != fp:
        problems.append("stored keys/labels do not match spec dataset.fingerprint")
    return problems


def verify(
    path: str,
    replay: bool = False,
    replay_check: ReplayCheck | None = None,
    storage_options: dict | None = None,
) -> list[str]:
    """Problems found in the cache at `path` (empty list = OK); never writes to it.

    Unopenable paths raise KdcacheError. The replay check needs torch, so it is a callback
    from precompute: replay_check(cache) -> list of problems.
    """
    try:
        meta = read_meta(path, storage_options)
    except AttrsError as e:  # hand-edited attrs are a problem of the cache: exit 1, named
        return [str(e)]
    if meta.get("kind") == "tokens":
        from kdcache.cache.tokencopy import verify_token_cache

        return verify_token_cache(path, storage_options)
    members = meta.get("members") or [] if meta.get("kind") == MULTI else [None]
    problems: list[str] = []
    if meta.get("kind") == MULTI and not meta.get("complete"):
        problems.append("multi-teacher store was never completed (its merge did not finish)")
    for m in members:
        where = path if m is None else remote.join(path, m)
        prefix = "" if m is None else f"member {m}: "
        try:
            cache = open_cache(where, storage_options=storage_options)
        except AttrsError as e:
            problems.append(prefix + str(e))
            continue
        with cache:
            found = _verify_one(cache)
            if replay and not found:
                if replay_check is None:
                    found.append("replay requested but no replay_check given (needs precompute)")
                else:
                    found += list(replay_check(cache))
        problems += [prefix + p for p in found]
    for p in problems:
        log.info("verify %s: %s", path, p)
    return problems
