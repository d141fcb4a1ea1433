"""``text``: JSONL/CSV rows with ``text`` + ``label`` (and optional ``id``), kept as strings and
tokenized lazily per batch (``TextCollate``: dynamic padding, ``--max-length``).

Also the tokenizing side of every text source (``hfds:`` text datasets use it too).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import SourceBase, missing_split
from kdcache.data.datasets import register_source


class TextDataset(SourceBase):
    """Texts in RAM as plain strings (tens of bytes each); tokens exist only per batch."""

    modality = "text"

    def __init__(self, name, split, keys, labels, num_classes, texts, classes=None) -> None:
        self.name, self.split, self.keys, self.labels = name, split, keys, labels
        self.num_classes, self.texts, self.classes = num_classes, texts, classes

    def load(self, i: int) -> str:
        return self.texts[int(i)]

    def head(self, n: int) -> None:
        super().head(n)
        self.texts = self.texts[:n]


class TextCollate:
    """Tokenize a batch of texts: dynamic padding to the longest, truncation at max_length.

    The token ids of a sample do not depend on the batch (only the pad tail does), and the
    token-mask policy draws per position, so masks are batch-independent too."""

    def __init__(self, tokenizer, max_length: int) -> None:
        if max_length < 1:
            raise KdcacheError(f"--max-length {max_length} must be >= 1")
        # batches are small and tokenized in loader workers (forked): no Rust thread pool
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return enc["input_ids"].long()

    def token_lists(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, unpadded: the rows of `self(texts)` without their pad tail."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return enc["input_ids"]


def _text_files(root, split: str) -> tuple[Path, list[Path]]:
    if root is None:
        raise KdcacheError(
            "text needs --data-root FILE.jsonl|FILE.csv or a DIR with <split>.jsonl|csv"
        )
    p = Path(root)
    if p.is_file():
        if split != "train" and p.stem != split:
            raise missing_split(f"text file {str(p)!r}", split, [p.stem])
        return p, [p]
    for ext in (".jsonl", ".csv"):
        if (p / f"{split}{ext}").is_file():
            siblings = sorted(q for q in p.iterdir() if q.suffix in (".jsonl", ".csv"))
            return p / f"{split}{ext}", siblings
    have = (
        sorted(q.stem for q in p.iterdir() if q.suffix in (".jsonl", ".csv")) if p.is_dir() else []
    )
    if not p.exists():
        raise KdcacheError(f"text data {str(p)!r} does not exist")
    raise missing_split(f"text folder {str(p)!r} (<split>.jsonl|csv)", split, have)


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot read {str(path)!r}: {e}") from e
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "text" not in r or "label" not in r:
            raise KdcacheError(f"{str(path)!r} row {i} lacks a 'text' or 'label' field")
    return rows


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


@register_source("text", help="JSONL/CSV rows text,label[,id] (file or DIR/<split>.jsonl|csv)")
def _load_text(name: str, root, split: str, download: bool, **kw) -> TextDataset:
    """Rows with text + label (int, or string mapped to sorted classes over all split files)."""
    path, siblings = _text_files(root, split)
    rows = _read_rows(path)
    ints = [_as_int(r["label"]) for r in rows]
    classes = kw.get("classes")
    if classes is None and all(v is not None for v in ints):
        labels = np.asarray(ints, dtype=np.int64)
        num_classes = int(kw.get("num_classes") or (labels.max() + 1 if len(labels) else 0))
    else:
        if classes is None:
            every = {str(r["label"]) for f in siblings for r in _read_rows(f)}
            classes = sorted(every)
        index = {c: i for i, c in enumerate(classes)}
        missing = sorted({str(r["label"]) for r in rows} - set(index))
        if missing:
            raise KdcacheError(
                f"labels {missing[:5]} of {str(path)!r} are not in classes {classes}"
            )
        labels = np.asarray([index[str(r["label"])] for r in rows], dtype=np.int64)
        num_classes = len(classes)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdcacheError(f"labels of {str(path)!r} must lie in [0, {num_classes})")
    keys = [str(r["id"]) if r.get("id") not in (None, "") else str(i) for i, r in enumerate(rows)]
    if len(set(keys)) != len(keys):
        raise KdcacheError(f"{str(path)!r} has duplicate ids; keys must be unique")
    texts = [str(r["text"]) for r in rows]
    return TextDataset(name, split, keys, labels, num_classes, texts, classes)


def _seed_scores(seed: int, length: int) -> np.ndarray:
    """Per-position random scores of one sample; seed -1 (identity) masks nothing."""
    if seed < 0:
        return np.full(length, np.inf)
    return np.random.Generator(np.random.Philox(seed)).random(length)


def text_inputs(ids: torch.Tensor, pad_id: int, original: torch.Tensor | None = None) -> dict:
    """Model inputs from (masked) ids; the attention mask comes from the unmasked ids."""
    ref = ids if original is None else original
    return {"input_ids": ids, "attention_mask": (ref != pad_id).long()}


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Token ids (N, L <= max_length), padded to the longest, truncated (dynamic padding)."""
    enc = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=int(max_length),
        return_tensors="pt",
    )
    return enc["input_ids"].long()
