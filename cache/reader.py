"""Reading a cache fast: the Cache class, whole-cache RAM loads and chunk-aware epochs.

Random single-row reads from chunked storage are ~100x too slow for training, so training
either loads the cache into RAM (stored dtype, converted per batch) or iterates an epoch chunk
by chunk (shuffle chunk order, shuffle rows within a buffer of chunks).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cache.backends import Backend, decode
from cache.errors import KdcacheError
from cache.spec import FORMAT_VERSION, CacheSpec

log = logging.getLogger(__name__)

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def _first(idx: Any, k: int = 5) -> str:
    idx = [int(i) for i in idx]
    return f"{idx[:k]}" + (f" (+{len(idx) - k} more)" if len(idx) > k else "")


class Cache:
    """A cache opened for reading; every read returns float32 whatever the stored dtype."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.path = backend.path
        self.backend_name = backend.name
        try:
            meta = backend.get_meta()
            if not isinstance(meta.get("spec"), dict):
                raise KdcacheError(f"{self.path} has kdcache attrs without a spec; not a cache")
            if meta.get("format_version") != FORMAT_VERSION:
                raise KdcacheError(
                    f"cache {self.path} has format_version {meta.get('format_version')!r}; "
                    f"this kdcache reads {FORMAT_VERSION}"
                )
            self.spec = CacheSpec.from_dict(meta["spec"])
        except BaseException:
            backend.close()
            raise
        self.attrs: dict = meta
        self.key = self.spec.key()
        self.n, self.num_augs = self.spec.n, self.spec.num_augs
        self.num_classes, self.n_chunks = self.spec.num_classes, self.spec.n_chunks
        self.chunk_samples, self.dtype = self.spec.chunk_samples, self.spec.dtype
        self._done_cache: np.ndarray | None = None

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.path!r}, n={self.n}, A={self.num_augs}, C={self.num_classes})"

    def refresh(self) -> dict:
        """Re-read attrs (another rank may have finalized)."""
        self.attrs = self._b.get_meta()
        self._done_cache = None
        return self.attrs

    def labels(self) -> np.ndarray:
        return np.asarray(self._b.read("labels"), dtype=np.int64)

    def keys(self) -> list[str]:
        return self._b.read("keys")

    def view_params(self, samples: np.ndarray | None = None) -> np.ndarray:
        if samples is None:
            return np.asarray(self._b.read("view_params"), dtype=np.float32)
        uniq, inv = np.unique(self._check_samples(samples), return_inverse=True)
        return np.asarray(self._b.read_rows("view_params", uniq), dtype=np.float32)[inv]

    def done(self) -> np.ndarray:
        if self._done_cache is not None:
            return self._done_cache
        done = np.asarray(self._b.read("done")).astype(bool)
        if self.attrs.get("complete"):
            self._done_cache = done  # a finalized cache no longer changes
        return done

    def is_complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def _chunk_done(self, c: int) -> bool:
        return bool(np.asarray(self._b.read("done", c, c + 1))[0])

    def missing_chunks(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(~self.done())]

    def require_complete(self) -> None:
        if not self.is_complete():
            miss = self.missing_chunks()
            raise KdcacheError(
                f"cache {self.path} is incomplete: {len(miss)} of {self.n_chunks} chunks not done "
                f"{_first(miss)}" + ("" if miss else " (not finalized)")
            )

    def chunk_range(self, c: int) -> tuple[int, int]:
        if not 0 <= int(c) < self.n_chunks:
            raise KdcacheError(f"chunk {c} out of range; cache has chunks 0..{self.n_chunks - 1}")
        start = int(c) * self.chunk_samples
        return start, min(start + self.chunk_samples, self.n)

    def read_chunk_raw(self, c: int) -> np.ndarray:
        """A chunk's logits in the stored dtype (uint16 bits for bfloat16)."""
        start, stop = self.chunk_range(c)
        if not self.is_complete() and not self._chunk_done(c):
            raise KdcacheError(f"chunk {c} of {self.path} is not written yet")
        return np.asarray(self._b.read("logits", start, stop))

    def read_chunk(self, c: int) -> np.ndarray:
        return decode(self.read_chunk_raw(c), self.dtype)

    def _check_samples(self, samples: Any) -> np.ndarray:
        s = np.asarray(samples, dtype=np.int64).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= self.n):
            raise KdcacheError(
                f"sample index out of range 0..{self.n - 1}: {_first(s[(s < 0) | (s >= self.n)])}"
            )
        return s

    def read(self, samples: Any, augs: Any) -> np.ndarray:
        """logits[samples[j], augs[j]] as (B, C) float32; slow per row, prefer load/iter_epoch."""
        s = self._check_samples(samples)
        a = np.broadcast_to(np.asarray(augs, dtype=np.int64), s.shape)
        if a.size and (a.min() < 0 or a.max() >= self.num_augs):
            raise KdcacheError(f"aug index out of range 0..{self.num_augs - 1}")
        uniq, inv = np.unique(s, return_inverse=True)
        if not self.is_complete():
            undone = ~self.done()[uniq // self.chunk_samples]
            if undone.any():
                raise KdcacheError(f"samples {_first(uniq[undone])} are in chunks not written yet")
        raw = np.asarray(self._b.read_rows("logits", uniq))
        return decode(raw[inv, a], self.dtype)

    def nbytes(self) -> int:
        """Bytes of the logits in RAM in the stored dtype."""
        return self.n * self.num_augs * self.num_classes * (4 if self.dtype == "float32" else 2)

    def load(self, memory_budget: int | None = None) -> InMemoryLogits:
        """Whole cache in RAM (stored dtype), read chunk by chunk; KdcacheError over budget."""
        self.require_complete()
        need = self.nbytes()
        if memory_budget is not None and need > memory_budget:
            raise KdcacheError(
                f"cache {self.path} needs {need} bytes of RAM, over the memory budget of "
                f"{memory_budget}; use the chunk-aware reader (iter_epoch) instead"
            )
        first = self.read_chunk_raw(0)
        raw = np.empty((self.n,) + first.shape[1:], dtype=first.dtype)
        raw[: len(first)] = first
        for c in range(1, self.n_chunks):
            start, stop = self.chunk_range(c)
            raw[start:stop] = self.read_chunk_raw(c)
        return InMemoryLogits(raw, self.dtype, chunk_samples=self.chunk_samples)

    def close(self) -> None:
        self._b.close()


class InMemoryLogits:
    """All logits in RAM in the stored dtype; rows are converted to float32 only when read."""

    def __init__(self, raw: np.ndarray, dtype: str, chunk_samples: int | None = None) -> None:
        if raw.ndim != 3:
            raise KdcacheError(f"in-memory logits have shape {raw.shape}; expected (N, A, C)")
        self.raw, self.dtype = raw, dtype
        self.n, self.num_augs, self.num_classes = raw.shape
        self.chunk_samples = chunk_samples or self.n

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def read(self, samples: Any, augs: Any) -> np.ndarray:
        """logits[samples[j], augs[j]] as (B, C) float32."""
        s = np.asarray(samples, dtype=np.int64).reshape(-1)
        a = np.broadcast_to(np.asarray(augs, dtype=np.int64), s.shape)
        if s.size and (s.min() < 0 or s.max() >= self.n or a.min() < 0 or a.max() >= self.num_augs):
            raise KdcacheError(
                f"(sample, aug) out of range: samples 0..{self.n - 1}, augs 0..{self.num_augs - 1}"
            )
        return decode(self.raw[s, a], self.dtype)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (vectorized, wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def choose_augs(seed: int, epoch: int, samples: Any, num_augs: int) -> np.ndarray:
    """The aug of each sample this epoch: a hash of (seed, epoch, sample) only, so any batching,
    rank split or reader (RAM or chunk-aware) picks the same views."""
    if num_augs < 1:
        raise KdcacheError(f"num_augs is {num_augs}; expected >= 1")
    s = np.asarray(samples, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = _mix(_mix(np.array([seed % 2**64], dtype=np.uint64)) ^ np.uint64(epoch % 2**64))
        h = _mix(base ^ _mix(s + np.uint64(0x9E3779B97F4A7C15)))
    return (h % np.uint64(num_augs)).astype(np.int64)


def _pairs(samples: np.ndarray, aug_mode: Any, num_augs: int, seed: int, epoch: int):
    """The (sample, aug) pairs of an epoch for these samples."""
    if aug_mode == "random":
        return samples, choose_augs(seed, epoch, samples, num_augs)
    if aug_mode == "all":
        return np.repeat(samples, num_augs), np.tile(np.arange(num_augs), len(samples))
    if isinstance(aug_mode, (int, np.integer)) and not isinstance(aug_mode, bool):
        if not 0 <= aug_mode < num_augs:
            raise KdcacheError(f"aug_mode {aug_mode} out of range 0..{num_augs - 1}")
        return samples, np.full(len(samples), int(aug_mode), dtype=np.int64)
    raise KdcacheError(f"unknown aug_mode {aug_mode!r}; expected 'random', 'all' or an aug index")


def iter_epoch(
    source: Cache | InMemoryLogits,
    batch_size: int,
    seed: int,
    epoch: int,
    aug_mode: str | int = "random",
    buffer_chunks: int = 4,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Yield (samples int64[B], augs int64[B], logits float32[B, C]) covering every chosen
    (sample, aug) once per epoch; ranks get disjoint parts (chunks, or pairs in RAM).

    drop_last=True yields only full batches, the same number on every rank (what DDP needs);
    the few pairs left over are skipped that epoch.
    """
    if batch_size < 1 or buffer_chunks < 1:
        raise KdcacheError(
            f"batch_size and buffer_chunks must be >= 1; got {batch_size}, {buffer_chunks}"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise KdcacheError(f"rank {rank} out of range for world_size {world_size}")

    def pick(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _pairs(samples, aug_mode, source.num_augs, seed, epoch)

    pick(np.empty(0, np.int64))  # validate aug_mode before any reading
    per_sample = source.num_augs if aug_mode == "all" else 1
    key = [seed % 2**63, epoch % 2**63]
    if isinstance(source, InMemoryLogits):
        gen = _ram_epoch(source, batch_size, key, pick, rank, world_size)
        fewest = source.n * per_sample // world_size
    else:
        source.require_complete()
        order = np.random.default_rng(key + [0]).permutation(source.n_chunks)
        cs = source.chunk_samples
        sizes = np.array([min(cs, source.n - int(c) * cs) for c in order])
        fewest = min(int(sizes[r::world_size].sum()) for r in range(world_size)) * per_sample
        rng = np.random.default_rng(key + [1, rank])
        gen = _chunk_epoch(source, order[rank::world_size], batch_size, buffer_chunks, rng, pick)
    yield from itertools.islice(gen, fewest // batch_size if drop_last else None)


Pick = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _ram_epoch(
    src: InMemoryLogits, bs: int, key: list, pick: Pick, rank: int, world: int
) -> Iterator[Batch]:
    """Global shuffle of all the epoch's pairs; rank r takes every world-th pair."""
    s, a = pick(np.arange(src.n, dtype=np.int64))
    perm = np.random.default_rng(key + [0]).permutation(len(s))[rank::world]
    s, a = s[perm], a[perm]
    for i in range(0, len(s), bs):
        yield s[i : i + bs], a[i : i + bs], src.read(s[i : i + bs], a[i : i + bs])


def _chunk_epoch(
    src: Cache, chunks: np.ndarray, bs: int, buffer_chunks: int, rng: np.random.Generator,
    pick: Pick,
) -> Iterator[Batch]:  # fmt: skip
    """Read `buffer_chunks` chunks, shuffle their rows, yield full batches, carry the rest."""
    left_s = left_a = np.empty(0, np.int64)
    left_r: np.ndarray | None = None
    for i in range(0, len(chunks), buffer_chunks):
        parts_s, parts_a, parts_r = [], [], []
        for c in chunks[i : i + buffer_chunks]:
            start, stop = src.chunk_range(int(c))
            raw = src.read_chunk_raw(int(c))
            s, a = pick(np.arange(start, stop, dtype=np.int64))
            parts_s.append(s)
            parts_a.append(a)
            parts_r.append(raw[s - start, a])
        perm = rng.permutation(sum(len(p) for p in parts_s))
        s = np.concatenate([left_s, np.concatenate(parts_s)[perm]])
        a = np.concatenate([left_a, np.concatenate(parts_a)[perm]])
        rows = np.concatenate(parts_r)[perm]
        if left_r is not None:
            rows = np.concatenate([left_r, rows])
        full = len(s) - len(s) % bs
        for j in range(0, full, bs):
            yield s[j : j + bs], a[j : j + bs], decode(rows[j : j + bs], src.dtype)
        left_s, left_a, left_r = s[full:], a[full:], rows[full:]
    if len(left_s):
        yield left_s, left_a, decode(left_r, src.dtype)


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


def training_source(cache: Cache, memory_budget: int | None = None) -> Cache | InMemoryLogits:
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
