"""Epochs over a cache: which view each sample gets, RAM or chunk-aware batch iteration, and
the default read mode.

Random single-row reads from chunked storage are ~100x too slow for training, so training
either loads the cache into RAM (stored arrays, decoded per batch) or iterates an epoch chunk
by chunk (shuffle chunk order, shuffle rows within a buffer of chunks). Works the same for
dense and sparse caches: rows are gathered in their stored form and decoded per batch.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from kdcache.cache.dtypes import mix64
from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]
Rows = dict[str, np.ndarray]


def choose_augs(seed: int, epoch: int, samples: Any, num_augs: int) -> np.ndarray:
    """The aug of each sample this epoch: a hash of (seed, epoch, sample) only, so any batching,
    rank split or reader (RAM or chunk-aware) picks the same views."""
    if num_augs < 1:
        raise KdcacheError(f"num_augs is {num_augs}; expected >= 1")
    s = np.asarray(samples, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = mix64(mix64(np.array([seed % 2**64], dtype=np.uint64)) ^ np.uint64(epoch % 2**64))
        h = mix64(base ^ mix64(s + np.uint64(0x9E3779B97F4A7C15)))
    return (h % np.uint64(num_augs)).astype(np.int64)


def _pairs(
    samples: np.ndarray,
    aug_mode: Any,
    num_augs: int,
    seed: int,
    epoch: int,
    group: int = 1,
    mix_group: int = 0,
):
    """The (sample, aug) pairs of an epoch for these samples (``group`` > 1: that many
    distinct augs per sample, adjacent, starting at the sample's random aug)."""
    if aug_mode == "random" and group > 1:
        start = choose_augs(seed, epoch, samples, num_augs)
        augs = (start[:, None] + np.arange(group)) % num_augs
        return np.repeat(samples, group), augs.reshape(-1)
    if aug_mode == "random":  # pair-mode Mixup caches: one view per group of rows
        by = samples // mix_group if mix_group else samples
        return samples, choose_augs(seed, epoch, by, num_augs)
    if aug_mode == "all":
        return np.repeat(samples, num_augs), np.tile(np.arange(num_augs), len(samples))
    if isinstance(aug_mode, (int, np.integer)) and not isinstance(aug_mode, bool):
        if not 0 <= aug_mode < num_augs:
            raise KdcacheError(f"aug_mode {aug_mode} out of range 0..{num_augs - 1}")
        return samples, np.full(len(samples), int(aug_mode), dtype=np.int64)
    raise KdcacheError(f"unknown aug_mode {aug_mode!r}; expected 'random', 'all' or an aug index")


def iter_epoch(
    source: Any,
    batch_size: int,
    seed: int,
    epoch: int,
    aug_mode: str | int = "random",
    buffer_chunks: int = 4,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    group: int = 1,
    mix_group: int = 0,
    partner_fn: Callable | None = None,
) -> Iterator[Batch]:
    """Yield (samples int64[B], augs int64[B], logits float32[B, C]) covering every chosen
    (sample, aug) once per epoch; ranks get disjoint parts (chunks, or pairs in RAM).
    ``group`` > 1 (aug_mode "random"): each sample brings that many distinct augs, kept
    adjacent and never split across batches or ranks (one decode for all of them); batches
    hold ``batch_size // group`` samples. ``mix_group`` / ``partner_fn``: a pair-mode Mixup
    cache (data/pairs.py) picks "random" views per group of rows and keeps the two views of a
    pair adjacent (group 1 only).

    `source` is a Cache (chunk-aware) or an InMemoryLogits. drop_last=True yields only full
    batches, the same number on every rank (what DDP needs); the few pairs left over are
    skipped that epoch.
    """
    if batch_size < 1 or buffer_chunks < 1:
        raise KdcacheError(
            f"batch_size and buffer_chunks must be >= 1; got {batch_size}, {buffer_chunks}"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise KdcacheError(f"rank {rank} out of range for world_size {world_size}")

    if group > 1 and (aug_mode != "random" or group > source.num_augs):
        raise KdcacheError(
            f"group {group} needs aug_mode 'random' and <= {source.num_augs} augs per sample"
        )
    g = max(1, int(group))
    batch_size = max(1, batch_size // g) * g

    def pick(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _pairs(samples, aug_mode, source.num_augs, seed, epoch, g, mix_group)

    def adj(s: np.ndarray, a: np.ndarray) -> np.ndarray:
        return pair_order(s, a, partner_fn if g == 1 else None, source.num_augs)

    pick(np.empty(0, np.int64))  # validate aug_mode before any reading
    per_sample = source.num_augs if aug_mode == "all" else g
    key = [seed % 2**63, epoch % 2**63]
    if getattr(source, "in_memory", False):
        gen = _ram_epoch(source, batch_size, key, pick, rank, world_size, g, adj)
        fewest = source.n * per_sample // world_size
    else:
        source.require_complete()
        order = np.random.default_rng(key + [0]).permutation(source.n_chunks)
        cs = source.chunk_samples
        sizes = np.array([min(cs, source.n - int(c) * cs) for c in order])
        fewest = min(int(sizes[r::world_size].sum()) for r in range(world_size)) * per_sample
        rng = np.random.default_rng(key + [1, rank])
        gen = _chunk_epoch(
            source, order[rank::world_size], batch_size, buffer_chunks, rng, pick, g, adj
        )
    yield from itertools.islice(gen, fewest // batch_size if drop_last else None)


Pick = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _grouped(perm: np.ndarray, g: int) -> np.ndarray:
    """Pair indices of a permutation of groups of g adjacent pairs."""
    return perm if g == 1 else (perm[:, None] * g + np.arange(g)).reshape(-1)


def _ram_epoch(
    src: Any, bs: int, key: list, pick: Pick, rank: int, world: int, g: int = 1, adj=None
) -> Iterator[Batch]:
    """Global shuffle of all the epoch's pairs (groups); rank r takes every world-th one."""
    s, a = pick(np.arange(src.n, dtype=np.int64))
    perm = _grouped(np.random.default_rng(key + [0]).permutation(len(s) // g)[rank::world], g)
    s, a = s[perm], a[perm]
    if adj is not None:  # Mixup pairs side by side
        keep = adj(s, a)
        s, a = s[keep], a[keep]
    for i in range(0, len(s), bs):
        yield s[i : i + bs], a[i : i + bs], src.read(s[i : i + bs], a[i : i + bs])


def _take(rows: Rows, idx: Any) -> Rows:
    return {k: v[idx] for k, v in rows.items()}


def _chunk_epoch(
    src: Any, chunks: np.ndarray, bs: int, buffer_chunks: int, rng: np.random.Generator,
    pick: Pick, g: int = 1, adj=None,
) -> Iterator[Batch]:  # fmt: skip
    """Read `buffer_chunks` chunks (checksum-verified), shuffle their rows, yield full
    batches, carry the rest."""
    left_s = left_a = np.empty(0, np.int64)
    left_r: Rows | None = None
    for i in range(0, len(chunks), buffer_chunks):
        parts_s, parts_a, parts_r = [], [], []
        for c in chunks[i : i + buffer_chunks]:
            start, stop = src.chunk_range(int(c))
            stored = src.read_chunk_stored(int(c), verify=True)
            s, a = pick(np.arange(start, stop, dtype=np.int64))
            parts_s.append(s)
            parts_a.append(a)
            parts_r.append({k: v[s - start, a] for k, v in stored.items()})
        cat_s, cat_a = np.concatenate(parts_s), np.concatenate(parts_a)
        perm = _grouped(rng.permutation(len(cat_s) // g), g)
        if adj is not None:  # Mixup pairs side by side
            perm = perm[adj(cat_s[perm], cat_a[perm])]
        s = np.concatenate([left_s, cat_s[perm]])
        a = np.concatenate([left_a, cat_a[perm]])
        rows = {k: np.concatenate([p[k] for p in parts_r])[perm] for k in parts_r[0]}
        if left_r is not None:
            rows = {k: np.concatenate([left_r[k], v]) for k, v in rows.items()}
        full = len(s) - len(s) % bs
        for j in range(0, full, bs):
            yield s[j : j + bs], a[j : j + bs], src.decode_rows(_take(rows, slice(j, j + bs)))
        left_s, left_a, left_r = s[full:], a[full:], _take(rows, slice(full, None))
    if len(left_s):
        yield left_s, left_a, src.decode_rows(left_r)


def adjacent(partner: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """An order of entries (their ``keys`` = row * A + aug, in the epoch's shuffled order)
    that puts each entry's partner entry (``partner`` = its key, -1 none) right after it,
    pairs in the order of their first member; entries whose partner is absent go last.
    Stage 2 then replays both views of a pair in one batch (one pre-mix view each)."""
    keys, partner = np.asarray(keys, dtype=np.int64), np.asarray(partner, dtype=np.int64)
    n = len(keys)
    if n == 0:
        return np.arange(0)
    srt = np.argsort(keys, kind="stable")
    j = srt[np.minimum(np.searchsorted(keys[srt], partner), n - 1)]  # where the partner is
    i = np.arange(n)
    mutual = (partner >= 0) & (keys[j] == partner) & (partner[j] == keys) & (j != i)
    lead = np.where(mutual, np.minimum(i, j), n + i)  # unpaired: after every pair
    return np.lexsort((i, lead))


def pair_order(rows, augs, partner_fn, num_augs: int) -> np.ndarray:
    """``adjacent`` for (rows, augs) entries, the partner of each from ``partner_fn(rows,
    augs)`` (partner rows, -1 none); identity order when ``partner_fn`` is None."""
    rows = np.asarray(rows, dtype=np.int64)
    if partner_fn is None or not len(rows):
        return np.arange(len(rows))
    augs = np.asarray(augs, dtype=np.int64)
    p = np.asarray(partner_fn(rows, augs), dtype=np.int64)
    keys = rows * num_augs + augs
    return adjacent(np.where(p >= 0, p * num_augs + augs, -1), keys)


def default_memory_budget(fraction: float = 0.5) -> int:
    """A fraction of the RAM available now (MemAvailable), the default budget for load()."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * fraction)
    except (ValueError, OSError, AttributeError):
        return 0


def training_source(cache: Any, memory_budget: int | None = None) -> Any:
    """The default read mode: the whole cache in RAM when it fits the budget, else the cache
    itself for chunk-aware iter_epoch."""
    budget = default_memory_budget() if memory_budget is None else memory_budget
    if cache.nbytes() <= budget:
        return cache.load(budget)
    log.info(
        "cache %s (%d bytes) exceeds RAM budget %d: reading chunk-aware",
        cache.path,
        cache.nbytes(),
        budget,
    )
    cache.require_complete()
    return cache
