"""`distill --cache C --teacher T --fill-missing`: compute the chunks a cache lacks with the
online teacher and write them back under the writer lock, before training starts.

The missing chunks get exactly what stage 1 would have written: view params from
`(views.seed, sample, aug)`, the cache's own view policy, the teacher's raw logits, written
through `CacheWriter.write_chunk` (arrays, checksum, done flag), then the cache is finalized.
Stage 1 is not imported: the two stages meet only in the cache format.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.distill.feed import to_input

log = logging.getLogger(__name__)


def _check(cache, path: str, dataset, num_classes: int, teacher) -> None:
    from kdcache.data.loader import cache_rows

    if cache.n != len(dataset) or not cache_rows(cache.spec.dataset, cache.keys, dataset)[1]:
        raise KdcacheError(
            f"cache {path} (N={cache.n}) was computed on another dataset than "
            f"{dataset.name}/{dataset.split} (N={len(dataset)}); check --dataset/--data-root"
        )
    if cache.num_classes != num_classes:
        raise KdcacheError(f"cache {path} has {cache.num_classes} classes; expected {num_classes}")
    want, got = cache.spec.teacher, teacher.info
    if want.get("name") != got.get("name"):
        raise KdcacheError(
            f"--fill-missing: cache {path} holds teacher {want.get('name')!r}, "
            f"not --teacher {got.get('name')!r}"
        )
    if want.get("weights_sha256") != got.get("weights_sha256"):
        raise KdcacheError(
            f"--fill-missing: --teacher-weights have sha256 "
            f"{str(got.get('weights_sha256'))[:12]}; cache {path} was computed with "
            f"{str(want.get('weights_sha256'))[:12]}"
        )


def chunk_logits(teacher, loader_batches, n: int, a: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, A, C) float32 logits and (n, A, P) params of one chunk's loader batches."""
    outs, params = [], []
    got = 0
    while got < n:
        b = next(loader_batches)
        params.append(b["params"])
        got += len(b["rows"])
        outs.append(teacher.logits(None, None, to_input(b["views"], teacher.device)))
    logits = torch.cat(outs).cpu().numpy().reshape(n, a, -1)
    return logits, np.concatenate(params).reshape(n, a, -1)


def fill_missing(
    path: str, storage_options: dict | None, dataset, num_classes: int, teacher, batch_size: int
) -> int:
    """Fill every chunk of `path` that is not done; returns how many were computed."""
    from kdcache.cache.store import open_cache
    from kdcache.data.loader import (
        ViewMaker,
        cache_rows,
        chunk_batches,
        clean_errors,
        mix_align,
        precompute_loader,
    )
    from kdcache.data.views import get_policy

    with open_cache(path, "r", storage_options or None) as ro:
        _check(ro, path, dataset, num_classes, teacher)
        if ro.is_complete():
            log.info("--fill-missing: cache %s is complete; nothing to compute", path)
            return 0
    w = open_cache(path, "a", storage_options or None)  # the writer lock: one filler at a time
    try:
        v = w.spec.views
        a = int(v["num_augs"])
        policy = get_policy(v["policy"], **dict(v.get("params") or {}))
        order, _ = cache_rows(w.spec.dataset, w.keys, dataset)  # cache row -> sample
        todo = w.todo_chunks()
        ranges = [w.chunk_range(c) for c in todo]
        maker = ViewMaker(dataset, policy, getattr(dataset, "collate", None), rows=order)
        batches = chunk_batches(ranges, max(1, batch_size // a), mix_align(policy))
        loader = precompute_loader(maker, order, v["seed"], a, bool(v["identity_view"]), batches)
        it = clean_errors(loader)
        for c, (start, stop) in zip(todo, ranges, strict=True):
            logits, params = chunk_logits(teacher, it, stop - start, a)
            w.write_chunk(c, logits, params)
            log.info("--fill-missing: wrote chunk %d of %s", c, path)
        w.finalize()
    finally:
        w.close()
    return len(todo)


def fill_missing_rank0(rt, *args) -> int:
    """Under torchrun only rank 0 fills (one writer lock); the others wait for it and share
    its error, so every rank stops with the same one-line message."""
    from kdcache.models.runtime import broadcast_object

    done, err = 0, None
    if rt.is_main:
        try:
            done = fill_missing(*args)
        except KdcacheError as e:
            err = str(e)
    err = broadcast_object(rt, err)
    if err:
        raise KdcacheError(err)
    return done
