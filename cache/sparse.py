"""What a cache stores per (sample, aug) and how full-width logits come back.

dense:   `logits (N,A,C)` in the storage dtype.
topk:    `topk_values (N,A,K)` (storage dtype), `topk_indices (N,A,K)` int16/int32 and
         `tail_logsumexp (N,A)` float32: the exact top-K logits plus the log-mass of the rest.
sampled: `sampled_indices (N,A,W)` int16/int32 (-1 = padding) and `sampled_counts (N,A,W)`
         uint8/uint16, W = min(K, C): K draws with replacement from softmax(logits) (T=1),
         seeded by (views.seed, sample, aug); counts/K is an unbiased estimate of the teacher
         distribution (Random-Sampling KD, Anshumann et al. 2025, arXiv 2503.16870).

Readers always get float32 logits of width C, so every loss keeps working:
topk rebuilds the exact top-K logits and spreads the tail mass uniformly over the other
classes (exact at T=1, approximate at T != 1: the tail's shape is lost); sampled returns
log(counts/K) with a small floor (TAIL_FLOOR_MASS spread over all classes) so the softmax at
T=1 is the sampled target. Sparse targets are defined at T=1; softmax(z/T) of the rebuilt
logits at T != 1 is a sharpened/flattened version of the *sparse* target, not of the teacher's.
"""

from __future__ import annotations

import math

import numpy as np
from kdcache.cache.dtypes import GOLDEN, STORED_DTYPES, decode, encode, mix64
from kdcache.cache.errors import KdcacheError

FLOAT_DTYPES = tuple(STORED_DTYPES)
TAIL_FLOOR_MASS = 1e-4  # sampled: total probability given to the classes never drawn
MAX_SAMPLED = 65535

ArrayLayout = dict[str, tuple[tuple[int, ...], type, str]]  # name -> (shape, dtype, logical)


def index_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= 32768 else np.int32


def kind_of(storage: dict) -> str:
    if storage.get("topk") is not None:
        return "topk"
    if storage.get("sampled") is not None:
        return "sampled"
    return "dense"


def check_storage(storage: dict, num_classes: int) -> None:
    """Sparse options that make sense for C classes (called by CacheSpec)."""
    topk, sampled = storage.get("topk"), storage.get("sampled")
    if topk is not None and sampled is not None:
        raise KdcacheError(f"storage topk={topk} and sampled={sampled} exclude each other")
    if topk is not None and topk >= num_classes:
        raise KdcacheError(
            f"storage topk {topk} must be smaller than num_classes {num_classes} "
            "(a tail is needed; use a dense cache to keep every class)"
        )
    if sampled is not None and sampled > MAX_SAMPLED:
        raise KdcacheError(f"storage sampled {sampled} is too large; expected <= {MAX_SAMPLED}")


class Codec:
    """Dense storage: the logits themselves in the storage dtype."""

    kind = "dense"

    def __init__(self, spec) -> None:
        self.n, self.a, self.c = spec.n, spec.num_augs, spec.num_classes
        self.dtype = spec.dtype
        self.seed = int(spec.views.get("seed", 0) or 0)

    def layout(self) -> ArrayLayout:
        return {"logits": ((self.n, self.a, self.c), STORED_DTYPES[self.dtype], self.dtype)}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.layout())

    def entry_bytes(self) -> int:
        """Stored bytes per (sample, aug) entry (uncompressed)."""
        return sum(
            math.prod(shape[2:]) * np.dtype(dt).itemsize for shape, dt, _ in self.layout().values()
        )

    def value_names(self) -> tuple[str, ...]:
        """Arrays holding values in the storage dtype (checked for overflow on write)."""
        return tuple(k for k, (_, _, logical) in self.layout().items() if logical == self.dtype)

    def logical(self, name: str) -> str:
        return self.layout()[name][2]

    def encode(self, logits: np.ndarray, start: int) -> dict[str, np.ndarray]:
        return {"logits": encode(logits, self.dtype)}

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return decode(arrays["logits"], self.dtype)


def top_indices(z: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values along the last axis, sorted by value (descending),
    ties broken by the lower class index; O(C) per row (partition, not a full sort)."""
    lead, c = z.shape[:-1], z.shape[-1]
    z2 = z.reshape(-1, c)
    kth = -np.partition(-z2, k - 1, axis=-1)[:, k - 1 : k]  # the k-th largest value
    greater, equal = z2 > kth, z2 == kth
    keep = greater | equal
    need = k - greater.sum(-1)
    tied = np.flatnonzero(equal.sum(-1) > need)  # rows with surplus ties at the k-th value
    if tied.size:
        first = np.cumsum(equal[tied], -1) <= need[tied, None]
        keep[tied] = greater[tied] | (equal[tied] & first)
    idx = np.nonzero(keep)[1].reshape(-1, k)  # row-major: k per row, in class order
    vals = np.take_along_axis(z2, idx, -1)
    order = np.lexsort((idx, -vals), axis=-1)
    return np.take_along_axis(idx, order, -1).reshape(*lead, k)


class TopKCodec(Codec):
    kind = "topk"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.k = int(spec.storage["topk"])

    def layout(self) -> ArrayLayout:
        n, a, k, idx = self.n, self.a, self.k, index_dtype(self.c)
        return {
            "topk_values": ((n, a, k), STORED_DTYPES[self.dtype], self.dtype),
            "topk_indices": ((n, a, k), idx, np.dtype(idx).name),
            "tail_logsumexp": ((n, a), np.float32, "float32"),
        }

    def encode(self, logits: np.ndarray, start: int) -> dict[str, np.ndarray]:
        z = np.asarray(logits, dtype=np.float32)
        idx = top_indices(z, self.k)
        values = np.take_along_axis(z, idx, -1)
        rest = z.copy()
        np.put_along_axis(rest, idx, -np.inf, -1)
        m = rest.max(-1, keepdims=True)
        tail = (m + np.log(np.exp(rest - m).sum(-1, keepdims=True, dtype=np.float64)))[..., 0]
        return {
            "topk_values": encode(values, self.dtype),
            "topk_indices": idx.astype(index_dtype(self.c)),
            "tail_logsumexp": tail.astype(np.float32),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        values = decode(arrays["topk_values"], self.dtype)
        tail = np.asarray(arrays["tail_logsumexp"], dtype=np.float32)
        fill = tail - np.float32(math.log(self.c - self.k))  # uniform share of the tail mass
        out = np.repeat(fill[..., None], self.c, axis=-1)
        np.put_along_axis(out, arrays["topk_indices"].astype(np.intp), values, -1)
        return out


class SampledCodec(Codec):
    kind = "sampled"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.k = int(spec.storage["sampled"])
        self.w = min(self.k, self.c)

    def layout(self) -> ArrayLayout:
        n, a, w, idx = self.n, self.a, self.w, index_dtype(self.c)
        cnt = np.uint8 if self.k <= 255 else np.uint16
        return {
            "sampled_indices": ((n, a, w), idx, np.dtype(idx).name),
            "sampled_counts": ((n, a, w), cnt, np.dtype(cnt).name),
        }

    def uniforms(self, samples: np.ndarray, augs: int) -> np.ndarray:
        """(n, A, K) uniforms in [0, 1) keyed only by (seed, sample, aug, draw)."""
        with np.errstate(over="ignore"):
            key = mix64(np.uint64(self.seed % 2**64) ^ GOLDEN)
            hs = mix64(key ^ mix64(samples.astype(np.uint64) + GOLDEN))[:, None, None]
            ha = mix64(np.arange(augs, dtype=np.uint64) * GOLDEN + np.uint64(1))[None, :, None]
            hj = mix64(np.arange(self.k, dtype=np.uint64) * GOLDEN + np.uint64(2))[None, None]
            h = mix64(mix64(hs ^ ha) ^ hj)
        return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def encode(self, logits: np.ndarray, start: int) -> dict[str, np.ndarray]:
        z = np.asarray(logits, dtype=np.float64)
        n, a, c = z.shape
        e = np.exp(z - z.max(-1, keepdims=True))
        cdf = np.cumsum(e, -1).reshape(n * a, c)
        cdf /= cdf[:, -1:]
        u = self.uniforms(np.arange(start, start + n), a).reshape(n * a, self.k)
        draws = np.empty((n * a, self.k), dtype=np.int64)
        for r in range(n * a):  # inverse CDF per row (exact; ~2 us a row)
            draws[r] = np.searchsorted(cdf[r], u[r], side="right")
        draws = np.sort(np.minimum(draws, c - 1), axis=1)
        first = np.ones_like(draws, dtype=bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        slot = (np.cumsum(first, axis=1) - 1).ravel()
        rows = np.repeat(np.arange(n * a), self.k)
        idx = np.full((n * a, self.w), -1, dtype=index_dtype(c))
        idx[rows, slot] = draws.ravel()
        counts = np.bincount(rows * self.w + slot, minlength=n * a * self.w)
        cnt_dtype = self.layout()["sampled_counts"][1]
        return {
            "sampled_indices": idx.reshape(n, a, self.w),
            "sampled_counts": counts.reshape(n, a, self.w).astype(cnt_dtype),
        }

    def probs(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The sampled target counts/K as dense float32 probabilities (..., C)."""
        idx = np.asarray(arrays["sampled_indices"]).astype(np.intp)
        cnt = np.asarray(arrays["sampled_counts"]).astype(np.float32)
        lead = idx.shape[:-1]
        idx, cnt = idx.reshape(-1, self.w), cnt.reshape(-1, self.w)
        total = np.maximum(cnt.sum(-1, keepdims=True), 1)
        q = np.zeros((len(idx), self.c), dtype=np.float32)
        rows, cols = np.nonzero(cnt > 0)
        q[rows, idx[rows, cols]] = (cnt / total)[rows, cols]
        return q.reshape(*lead, self.c)

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        q = self.probs(arrays)
        return np.log(q * np.float32(1 - TAIL_FLOOR_MASS) + np.float32(TAIL_FLOOR_MASS / self.c))


def get_codec(spec) -> Codec:
    return {"dense": Codec, "topk": TopKCodec, "sampled": SampledCodec}[kind_of(spec.storage)](spec)


def describe(storage: dict) -> str:
    """'dense', 'top-50', 'sampled-64' (for ls/info)."""
    kind = kind_of(storage)
    return kind if kind == "dense" else f"{'top' if kind == 'topk' else 'sampled'}-{storage[kind]}"


def kl_sum(dense: np.ndarray, rebuilt: np.ndarray, temperature: float) -> float:
    """Sum over rows of KL(softmax(dense/T) || softmax(rebuilt/T)), in float64."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(dense), log_softmax(rebuilt)
    return float((np.exp(lp) * (lp - lq)).sum())
