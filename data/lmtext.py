"""Language-model corpora for token caches: rows of ``text`` (JSONL/CSV, ``hfds:``) or chat
``messages``, tokenized and split into consecutive windows of at most ``max_length`` tokens.

Each window is one sample keyed ``<rowkey>#<window>``. Tokenizing is one streaming pass whose
ids go to a temporary file (memory-mapped), so stage 1's memory does not grow with the corpus;
that pass also gives every sample's length up front (the cache's offsets) and the dataset
fingerprint (sha256 over keys, token ids and loss masks).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from kdcache.cache.errors import KdcacheError


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except ValueError as e:
                raise KdcacheError(f"{str(path)!r} line {i + 1} is not JSON ({e})") from None


def _rows_csv(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        yield from enumerate(csv.DictReader(f))


def iter_rows(dataset: str, root: str | None, split: str, text_column: str | None = None):
    """(row key, text str | messages list) for every row of a text or hfds: corpus."""
    col = text_column or "text"
    if dataset == "text":
        from kdcache.data.text import _text_files

        path, _ = _text_files(root, split)
        rows = _rows_csv(path) if path.suffix == ".csv" else _rows_jsonl(path)
        where = str(path)
    elif dataset.startswith("hfds:"):
        from kdcache.data.hfds import KEY_NAMES, TEXT_NAMES, _open

        ds = _open(dataset[5:], split)
        cols = list(ds.column_names)
        if text_column is None:
            col = next(
                (c for c in TEXT_NAMES if c in cols), "messages" if "messages" in cols else None
            )
            if col is None:
                raise KdcacheError(
                    f"{dataset} has no text column (looked for {TEXT_NAMES + ('messages',)}); "
                    f"columns: {', '.join(cols)}; pass --text-column"
                )
        elif col not in cols:
            raise KdcacheError(f"{dataset} has no column {col!r}; columns: {', '.join(cols)}")
        kcol = next((c for c in KEY_NAMES if c in cols), None)
        rows = ((i, r) for i, r in enumerate(ds.select_columns([c for c in (col, kcol) if c])))
        where = dataset
    else:
        raise KdcacheError(
            f"dataset {dataset!r} for a causal-LM teacher; expected 'text' (JSONL/CSV with a "
            "'text' or 'messages' field) or hfds:PATH"
        )
    seen: set[str] = set()
    for i, r in rows:
        if not isinstance(r, dict):
            raise KdcacheError(f"{where} row {i} is not an object; expected a 'text' field")
        key = r.get("id", r.get("__key__", r.get("key")))
        key = str(i) if key in (None, "") else str(key)
        if key in seen:
            raise KdcacheError(f"{where} has the id {key!r} twice; keys must be unique")
        seen.add(key)
        if col in r and isinstance(r[col], str):
            yield key, r[col]
        elif isinstance(r.get("messages"), (list, str)):
            msgs = r["messages"]
            yield key, json.loads(msgs) if isinstance(msgs, str) else msgs
        else:
            got = repr(r.get(col))[:40] if col in r else "no such field"
            raise KdcacheError(
                f"{where} row {i} has no {col!r} string ({got}); expected a {col!r} field "
                "(or 'messages' for a chat row)"
            )


def encode_chat(tok, messages: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a chat rendered with the tokenizer's template, and a loss mask that is 1
    on assistant turns only (their characters located by rendering growing prefixes)."""
    if not getattr(tok, "chat_template", None):
        raise KdcacheError(
            f"{where} is a chat row ('messages') but the tokenizer has no chat template"
        )
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise KdcacheError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = (
            tok.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True)
            if j
            else ""
        )
        after = tok.apply_chat_template(messages[: j + 1], tokenize=False)
        if not (full.startswith(after) and after.startswith(before)):
            raise KdcacheError(f"{where}: the chat template does not render prefixes consistently")
        spans.append((len(before), len(after)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)
    mask = np.zeros(len(ids), np.uint8)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if any(lo <= a < hi and b > a for lo, hi in spans):
            mask[t] = 1
    return ids, mask


def encode_row(tok, item, where: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item, str):
        ids = np.asarray(tok(item)["input_ids"], np.int64)
        return ids, np.ones(len(ids), np.uint8)
    return encode_chat(tok, item, where)


class TokenizedCorpus:
    """Samples (windows) of a corpus: keys, lengths, and their ids/masks in a temp file."""

    def __init__(self, keys, lengths, ids_file, mask_file, n_rows, fingerprint, tmp) -> None:
        self.keys, self.lengths, self.n_rows = keys, np.asarray(lengths, np.int64), n_rows
        self.fingerprint, self._tmp = fingerprint, tmp
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        n_tok = int(self.offsets[-1])
        self._ids = (
            np.memmap(ids_file, np.int32, "r", shape=(n_tok,)) if n_tok else np.zeros(0, np.int32)
        )
        self._mask = (
            np.memmap(mask_file, np.uint8, "r", shape=(n_tok,)) if n_tok else np.zeros(0, np.uint8)
        )

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self._ids[lo:hi], np.int64), np.asarray(self._mask[lo:hi])

    def span(self, lo_row: int, hi_row: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[lo_row]), int(self.offsets[hi_row])
        return np.asarray(self._ids[lo:hi]), np.asarray(self._mask[lo:hi])

    def close(self) -> None:
        self._ids = self._mask = None
        self._tmp.cleanup()


def tokenize_corpus(
    rows, tok, max_length: int, vocab_size: int, max_samples: int | None = None
) -> TokenizedCorpus:
    """One streaming pass: tokenize, window, fingerprint, spill ids to a temp file."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = tempfile.TemporaryDirectory(prefix="kdcache-lm-")
    ids_path, mask_path = os.path.join(tmp.name, "ids"), os.path.join(tmp.name, "mask")
    keys: list[str] = []
    lengths: list[int] = []
    h = hashlib.sha256()
    n_rows = 0
    try:
        with open(ids_path, "wb") as fi, open(mask_path, "wb") as fm:
            for key, item in rows:
                n_rows += 1
                ids, mask = encode_row(tok, item, f"row {key!r}")
                if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise KdcacheError(
                        f"row {key!r} has token id {int(ids.max())} outside the teacher's "
                        f"vocabulary of {vocab_size}; the tokenizer does not match the model"
                    )
                for w, lo in enumerate(range(0, len(ids), max_length)):
                    if max_samples is not None and len(keys) >= max_samples:
                        break
                    wid = ids[lo : lo + max_length].astype(np.int32)
                    wm = mask[lo : lo + max_length]
                    k = f"{key}#{w}"
                    keys.append(k)
                    lengths.append(len(wid))
                    fi.write(wid.tobytes())
                    fm.write(wm.tobytes())
                    h.update(k.encode() + b"\0" + wid.astype("<i4").tobytes() + wm.tobytes())
                if max_samples is not None and len(keys) >= max_samples:
                    break
        if not keys:
            raise KdcacheError("the corpus has no tokens (every row is empty)")
        return TokenizedCorpus(keys, lengths, ids_path, mask_path, n_rows, h.hexdigest(), tmp)
    except BaseException:
        tmp.cleanup()
        raise
