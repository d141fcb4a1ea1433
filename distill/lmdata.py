"""Rows of a language-model run and their batches (padded to the batch's longest row).

A row is a run of T token ids; position t predicts token t+1. Training rows come from a token
cache (ids + the teacher's stored targets, `kdcache.cache.tokens`) or, without a cache, from a
text corpus tokenized by `kdcache.data.lmtext` (the same windows stage 1 makes). Held-out rows
are tokenized text. A batch keeps only the positions that count (t + 1 < T and the loss mask of
token t + 1), flattened in row-major order, so the loss sees (N, V) student logits, (N,) next
tokens and (N, K) targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from kdcache.distill.lmloss import SparseTargets


@dataclass
class Flat:
    """Several rows concatenated: ``input_ids`` (ΣT,), ``lengths`` (B,), ``loss_mask`` (ΣT,)
    and, from a cache, ``ids``/``values`` (ΣT, K) and ``tail`` (ΣT,) (None: sampled)."""

    input_ids: np.ndarray
    lengths: np.ndarray
    loss_mask: np.ndarray
    mode: str | None = None
    ids: np.ndarray | None = None
    values: np.ndarray | None = None
    tail: np.ndarray | None = None


class CorpusRows:
    """Windows of a tokenized corpus (`data.lmtext.TokenizedCorpus`, memory-mapped)."""

    def __init__(self, corpus) -> None:
        self.corpus, self.keys = corpus, list(corpus.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return int(self.corpus.n_tokens)

    def fetch(self, rows: np.ndarray) -> Flat:
        parts = [self.corpus.sample(int(r)) for r in rows]
        ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        mask = np.concatenate([p[1] for p in parts]).astype(bool)
        return Flat(ids, np.asarray([len(p[0]) for p in parts], np.int64), mask)


class CacheRows:
    """The rows of a token cache. Held in RAM when the cache fits ``budget`` bytes (read once,
    in row order), otherwise read per batch through the cache's batched reader."""

    def __init__(self, cache, budget: int) -> None:
        self.cache, self.mode = cache, cache.mode
        self.offsets = np.asarray(cache.offsets, dtype=np.int64)
        self.keys = list(cache.keys)
        per_token = 8 + 1 + cache.k * (8 + 4) + 4
        self.ram: Flat | None = None
        if self.num_tokens * per_token <= budget:
            self.ram = self._read(np.arange(len(self)))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def _read(self, rows: np.ndarray) -> Flat:
        input_ids, ids, values, tail, lengths = self.cache.batch(rows)
        return Flat(
            np.asarray(input_ids, np.int64),
            np.asarray(lengths, np.int64),
            np.asarray(self.cache.batch_mask(rows), bool),
            self.mode,
            np.asarray(ids, np.int64),
            np.asarray(values, np.float32),
            None if tail is None else np.asarray(tail, np.float32),
        )

    def fetch(self, rows: np.ndarray) -> Flat:
        if self.ram is None:
            return self._read(rows)
        idx = np.concatenate(
            [np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]
        ).astype(np.int64)
        r = self.ram
        return Flat(
            r.input_ids[idx],
            self.offsets[rows + 1] - self.offsets[rows],
            r.loss_mask[idx],
            r.mode,
            r.ids[idx],
            r.values[idx],
            None if r.tail is None else r.tail[idx],
        )


def collate(f: Flat) -> dict:
    """Pad to the longest row; keep the positions that predict a counted token."""
    width = int(f.lengths.max()) if len(f.lengths) else 0
    starts = np.concatenate([[0], np.cumsum(f.lengths)[:-1]]).astype(np.int64)
    pos = np.arange(width)[None, :]
    inside = pos < f.lengths[:, None]
    flat_at = np.where(inside, starts[:, None] + pos, 0)
    input_ids = np.where(inside, f.input_ids[flat_at], 0)
    has_next = pos + 1 < f.lengths[:, None]
    nxt = np.where(has_next, starts[:, None] + pos + 1, 0)
    keep = has_next & f.loss_mask[nxt]
    src = flat_at[keep]  # the flat token whose stored targets predict the next one
    out = {
        "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(inside.astype(np.int64)),
        "keep": torch.from_numpy(keep),
        "labels": torch.from_numpy(f.input_ids[nxt[keep]].astype(np.int64)),
        "targets": None,
    }
    if f.ids is not None:
        tail = None if f.tail is None else torch.from_numpy(f.tail[src])
        out["targets"] = SparseTargets(
            f.mode, torch.from_numpy(f.ids[src]), torch.from_numpy(f.values[src]), tail
        )
    return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's row order: a permutation drawn from (seed, epoch) only."""
    rng = np.random.Generator(np.random.Philox(key=[int(seed) & (2**64 - 1), int(epoch)]))
    return rng.permutation(n)


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world: int,
                 with_empty: bool = False):  # fmt: skip
    """Global batches of ``batch_size`` rows; each rank takes every world-th row of each.
    ``with_empty``: yield ``(rows, first row of the global batch)`` for every global batch,
    ``rows`` possibly empty (a short last batch), so all ranks step together under DDP."""
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        rows = batch[rank::world]
        if with_empty:
            yield rows, batch[:1]
        elif len(rows):
            yield rows
