"""Check a cache end to end: completeness, checksums, NaN/Inf, shapes/dtypes, attrs, replay."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from cache.backends import decode, layout
from cache.errors import KdcacheError
from cache.reader import Cache
from cache.spec import dataset_fingerprint
from cache.store import chunk_digest, open_cache

log = logging.getLogger(__name__)

ReplayCheck = Callable[[Cache], list[str]]


def _short(idx: list[int], k: int = 8) -> str:
    idx = [int(i) for i in idx]
    return f"{idx[:k]}" + (f" (+{len(idx) - k} more)" if len(idx) > k else "")


def _check_layout(cache: Cache) -> list[str]:
    problems = []
    for name, (shape, dtype, _chunks) in layout(cache.spec).items():
        try:
            got = cache._b.shape(name)
            got_dtype = cache._b.stored_dtype(name)
        except KdcacheError as e:
            problems.append(str(e))
            continue
        if got != shape:
            problems.append(f"array {name} has shape {got}; spec says {shape}")
        want = "str" if name == "keys" else np.dtype(dtype).name
        if name == "logits":
            want = cache.spec.dtype
        if got_dtype != want:
            problems.append(f"array {name} has dtype {got_dtype}; spec says {want}")
    return problems


def _check_chunks(cache: Cache, sums: np.ndarray, done: np.ndarray) -> list[str]:
    problems = []
    for c in np.flatnonzero(done):
        start, stop = cache.chunk_range(int(c))
        where = f"chunk {c} (samples {start}..{stop - 1})"
        raw = np.asarray(cache._b.read("logits", start, stop))
        vp = np.asarray(cache._b.read("view_params", start, stop), dtype=np.float32)
        if chunk_digest(raw, vp) != bytes(sums[c]):
            problems.append(f"{where}: checksum mismatch (data corrupted)")
        bad = ~np.isfinite(decode(raw, cache.dtype).reshape(stop - start, -1)).all(axis=1)
        if bad.any():
            problems.append(
                f"{where}: NaN/Inf logits at samples {_short(list(start + np.flatnonzero(bad)))}"
            )
    return problems


def verify(
    path: str,
    replay: bool = False,
    replay_check: ReplayCheck | None = None,
    storage_options: dict | None = None,
) -> list[str]:
    """Problems found in the cache at `path` (empty list = OK).

    Unopenable paths raise KdcacheError. The replay check needs torch, so it is a callback
    from precompute: replay_check(cache) -> list of problems.
    """
    with open_cache(path, storage_options=storage_options) as cache:
        problems = _check_layout(cache)
        meta = cache.attrs
        if meta.get("key") != cache.key:
            problems.append(f"attrs key {meta.get('key')} != key of the stored spec {cache.key}")
        if problems:  # arrays do not match the spec: chunk checks would only add noise
            return problems
        done = cache.done()
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
        labels, keys = cache.labels(), cache.keys()
        fp = cache.spec.dataset.get("fingerprint")
        if fp is not None and dataset_fingerprint(keys, labels) != fp:
            problems.append("stored keys/labels do not match spec dataset.fingerprint")
        if replay:
            if replay_check is None:
                problems.append("replay requested but no replay_check given (needs precompute)")
            else:
                problems += list(replay_check(cache))
    for p in problems:
        log.info("verify %s: %s", path, p)
    return problems
