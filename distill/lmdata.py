"""Batches for causal-LM students: rows of a token cache (input ids + teacher targets) or
token windows of a text file, padded to the batch's longest sequence.

Position t of a row predicts token t + 1; the cache stores the teacher's distribution after
token t at position t, so prediction t pairs with cached position t (the last position of a
row predicts nothing). A target token counts when the row's loss mask is set on it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.distill.lmloss import TokenTargets


@dataclass
class LmBatch:
    """A padded batch and the flat positions that are trained."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64
    pos: torch.Tensor  # (M,) int64 index into the flattened (B*L) logits
    labels: torch.Tensor  # (M,) int64 next tokens
    weight: torch.Tensor  # (M,) float32 loss mask
    targets: TokenTargets | None  # (M, K) teacher targets, or None

    @property
    def tokens(self) -> int:
        return int(self.weight.sum())

    def to(self, device: torch.device) -> LmBatch:
        nb = device.type == "cuda"
        return LmBatch(
            self.input_ids.to(device, non_blocking=nb),
            self.attention_mask.to(device, non_blocking=nb),
            self.pos.to(device, non_blocking=nb),
            self.labels.to(device, non_blocking=nb),
            self.weight.to(device, non_blocking=nb),
            None if self.targets is None else self.targets.to(device),
        )


def pad_rows(seqs: list[np.ndarray], masks: list[np.ndarray], pad_id: int):
    """(input_ids, attention_mask, pos, labels, weight, src) of ragged rows; `src` is each
    trained position's index in the rows concatenated (to pick cached targets)."""
    width = max(len(s) for s in seqs)
    b = len(seqs)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    att = np.zeros((b, width), dtype=np.int64)
    pos, src, labels, weight = [], [], [], []
    start = 0
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        n = len(s)
        ids[i, :n], att[i, :n] = s, 1
        t = np.arange(n - 1)
        pos.append(i * width + t)
        src.append(start + t)
        labels.append(s[1:])
        weight.append(m[1:])
        start += n
    cat = np.concatenate
    return (
        torch.from_numpy(ids),
        torch.from_numpy(att),
        torch.from_numpy(cat(pos).astype(np.int64)),
        torch.from_numpy(cat(labels).astype(np.int64)),
        torch.from_numpy(cat(weight).astype(np.float32)),
        cat(src).astype(np.int64),
    )


class CacheRows:
    """Reads batches of rows from a token cache (targets only when the loss needs them)."""

    def __init__(self, cache, pad_id: int, with_targets: bool) -> None:
        self.cache, self.pad_id, self.with_targets = cache, int(pad_id), with_targets
        self.mode = cache.mode

    def __len__(self) -> int:
        return len(self.cache)

    def row_tokens(self) -> np.ndarray:
        return np.diff(np.asarray(self.cache.offsets)).astype(np.int64)

    def _read(self, rows: list[int]):
        if hasattr(self.cache, "batch"):
            got = self.cache.batch(rows)
            inp, ids, vals, tail, lengths = got[0], got[1], got[2], got[3], got[-1]
            lengths = np.asarray(lengths, dtype=np.int64)
            cuts = np.cumsum(lengths)[:-1]
            seqs = np.split(np.asarray(inp, dtype=np.int64), cuts)
        else:  # the per-row path of the contract
            parts = [self.cache.tokens(r) for r in rows]
            seqs = [np.asarray(p[0], dtype=np.int64) for p in parts]
            ids = np.concatenate([p[1] for p in parts])
            vals = np.concatenate([p[2] for p in parts])
            tail = None if parts[0][3] is None else np.concatenate([p[3] for p in parts])
        return seqs, ids, vals, tail

    def batch(self, rows: list[int]) -> LmBatch:
        seqs, ids, vals, tail = self._read(rows)
        masks = [np.asarray(self.cache.loss_mask(r), dtype=bool) for r in rows]
        inp, att, pos, labels, weight, src = pad_rows(seqs, masks, self.pad_id)
        targets = None
        if self.with_targets:
            t = None if tail is None else torch.from_numpy(np.asarray(tail, np.float32)[src])
            targets = TokenTargets(
                self.mode,
                torch.from_numpy(np.asarray(ids)[src].astype(np.int64)),
                torch.from_numpy(np.asarray(vals, dtype=np.float32)[src]),
                t,
            )
        return LmBatch(inp, att, pos, labels, weight, targets)


class TextWindows:
    """Token windows of texts (each text cut into consecutive runs of max_length tokens)."""

    mode = None

    def __init__(self, windows: list[np.ndarray], pad_id: int) -> None:
        self.windows, self.pad_id = windows, int(pad_id)

    def __len__(self) -> int:
        return len(self.windows)

    def row_tokens(self) -> np.ndarray:
        return np.asarray([len(w) for w in self.windows], dtype=np.int64)

    def batch(self, rows: list[int]) -> LmBatch:
        seqs = [self.windows[r] for r in rows]
        masks = [np.ones(len(s), dtype=bool) for s in seqs]
        inp, att, pos, labels, weight, _ = pad_rows(seqs, masks, self.pad_id)
        return LmBatch(inp, att, pos, labels, weight, None)


def read_text_rows(root, split: str) -> tuple[list[str], list[str]]:
    """(keys, texts) of a JSONL/CSV file (or DIR/<split>.jsonl|csv) whose rows have `text`."""
    if root is None:
        raise KdcacheError("a language-model corpus needs --data-root FILE.jsonl|csv or a DIR")
    p = Path(root)
    if p.is_dir():
        found = [p / f"{split}{e}" for e in (".jsonl", ".csv") if (p / f"{split}{e}").is_file()]
        if not found:
            raise KdcacheError(f"--data-root {str(p)!r} has no {split}.jsonl or {split}.csv")
        p = found[0]
    elif not p.is_file():
        raise KdcacheError(f"--data-root {str(p)!r} does not exist; expected a JSONL/CSV file")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f)) if p.suffix == ".csv" else [
                json.loads(line) for line in f if line.strip()
            ]  # fmt: skip
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot read {str(p)!r}: {e}") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise KdcacheError(f"{str(p)!r} row {i} has no 'text' string; expected rows with text")
    keys = [str(r["id"]) if r.get("id") not in (None, "") else str(i) for i, r in enumerate(rows)]
    return keys, [r["text"] for r in rows]


def token_windows(tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Each text tokenized whole, then cut into windows of max_length tokens (>= 2 tokens)."""
    out = []
    for text in texts:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        for a in range(0, len(ids), max_length):
            w = ids[a : a + max_length]
            if len(w) >= 2:
                out.append(w)
    return out


def epoch_rows(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int):
    """Global batches of a seeded permutation (seed, epoch); each rank takes its slice."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for a in range(0, n, batch_size):
        chunk = order[a : a + batch_size]
        if len(chunk) < world:  # every rank needs a row (DDP steps together): drop the rest
            break
        yield [int(r) for r in chunk[rank::world]]
