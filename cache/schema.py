"""One schema for the `kdcache` attrs, checked on every open.

Attrs are JSON that anyone can hand-edit or damage, so nothing downstream may trust their
types: `"complete": "no"` must not read as true, `"checksums": 5` must not become a
traceback, and a multi-teacher member named `../../victim` must never become a path outside
the store. Every problem is one KdcacheError naming the field, its value and what was expected.
"""

from __future__ import annotations

import re
from typing import Any

from kdcache.cache.errors import AttrsError, KdcacheError

MULTI = "multi-teacher"
TOKENS = "tokens"  # a token-level cache of a causal-LM teacher (cache/tokens.py)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# a member of a multi-teacher store, a tokenizer file name: one plain path component
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COUNTS = ("n", "num_augs", "num_classes", "n_chunks")
_TOKEN_COUNTS = ("n", "n_tokens", "n_chunks")
# view-policy params whose type is known (data/views.py); others are the policy's to check
_INT_PARAMS = ("pad", "pad_id", "mask_id")
_PAIR_PARAMS = ("scale", "ratio")


def plain_name(name: Any, what: str) -> str:
    """`name` if it is one plain path component (no `/`, `\\`, `..`, leading dot or `~`)."""
    if not isinstance(name, str) or not _PLAIN.match(name) or name in (".", ".."):
        raise KdcacheError(
            f"{what} {name!r} is not a plain name (expected letters, digits, '_', '-', '.'; "
            "no path separators or '..')"
        )
    return name


def _bad(path: str, field: str, value: Any, expected: str) -> AttrsError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return AttrsError(f"{path}: attrs field {field!r} is {shown}; expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(meta: dict, path: str, field: str, types: tuple, expected: str) -> None:
    if field in meta and meta[field] is not None and not isinstance(meta[field], types):
        raise _bad(path, field, meta[field], expected)


def check_multi(meta: dict, path: str) -> dict:
    """A multi-teacher store's root attrs: members are unique plain names."""
    members = meta.get("members")
    if not isinstance(members, list) or not members:
        raise _bad(path, "members", members, "a non-empty list of member names")
    for m in members:
        plain_name(m, f"{path}: member")
    if len(set(members)) != len(members):
        raise _bad(path, "members", members, "unique names")
    if not isinstance(meta.get("complete"), bool):
        raise _bad(path, "complete", meta.get("complete"), "true or false")
    return meta


def check_meta(meta: Any, path: str) -> dict:
    """Validate the attrs of a cache or of a multi-teacher store; returns them unchanged."""
    if not isinstance(meta, dict):
        raise AttrsError(f"{path}: attrs 'kdcache' is {type(meta).__name__}; expected an object")
    kind = meta.get("kind")
    if kind is not None and kind not in (MULTI, TOKENS):
        raise _bad(path, "kind", kind, f"absent, {MULTI!r} or {TOKENS!r}")
    fv = meta.get("format_version")
    if not _is_int(fv):
        raise _bad(path, "format_version", fv, "an integer")
    if kind == MULTI:
        return check_multi(meta, path)
    if not isinstance(meta.get("spec"), dict):
        raise KdcacheError(f"{path} has kdcache attrs without a spec; not a cache")
    if not isinstance(meta.get("complete"), bool):
        raise _bad(path, "complete", meta.get("complete"), "true or false")
    key = meta.get("key")
    if not (isinstance(key, str) and _HEX64.match(key)):
        raise _bad(path, "key", key, "64 lowercase hex digits")
    sums = meta.get("checksums")
    if sums is not None:
        if not isinstance(sums, list):
            raise _bad(path, "checksums", sums, "null or a list of sha256 hex strings")
        for i, s in enumerate(sums):
            if not (isinstance(s, str) and _HEX64.match(s)):
                raise _bad(path, f"checksums[{i}]", s, "64 lowercase hex digits")
    if meta["complete"] and sums is None:
        raise _bad(path, "checksums", sums, "a list of sha256 hex strings (the cache is complete)")
    counts = meta.get("counts")
    want_counts = _TOKEN_COUNTS if kind == TOKENS else _COUNTS
    if counts is not None:
        if not isinstance(counts, dict) or not all(_is_int(counts.get(k)) for k in want_counts):
            raise _bad(path, "counts", counts, f"an object of integers {list(want_counts)}")
    _optional(meta, path, "provenance", (dict,), "an object")
    _optional(meta, path, "finalized_at", (str,), "a timestamp string")
    _optional(meta, path, "sparse_kl", (dict,), "an object")
    _optional(meta, path, "kl_sample", (dict,), "an object")
    _optional(meta, path, "tokenizer", (dict,), "an object")
    tok = meta.get("tokenizer")
    if tok is not None:
        if not (isinstance(tok.get("sha256"), str) and _HEX64.match(tok["sha256"])):
            raise _bad(path, "tokenizer.sha256", tok.get("sha256"), "64 lowercase hex digits")
        if not _is_int(tok.get("bytes")) or tok["bytes"] < 0:
            raise _bad(path, "tokenizer.bytes", tok.get("bytes"), "a non-negative integer")
        files = tok.get("files")
        if not isinstance(files, list):
            raise _bad(path, "tokenizer.files", files, "a list of file names")
        for f in files:
            plain_name(f, f"{path}: tokenizer file")
    if kind != TOKENS:
        _check_view_params(meta["spec"], path)
    return meta


def _check_view_params(spec: dict, path: str) -> None:
    views = spec.get("views")
    params = views.get("params") if isinstance(views, dict) else None
    if params is None:
        return
    if not isinstance(params, dict):
        raise _bad(path, "spec.views.params", params, "an object")
    for name, v in params.items():
        field = f"spec.views.params.{name}"
        if name in _INT_PARAMS and not (_is_int(v) and v >= 0):
            raise _bad(path, field, v, "a non-negative integer")
        if name == "p" and not (_is_num(v) and 0 <= v <= 1):
            raise _bad(path, field, v, "a number in [0, 1]")
        if name == "size" and not (
            v is None or (_is_int(v) and v > 0)
            or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v))
        ):  # fmt: skip
            raise _bad(path, field, v, "null, a positive integer or [H, W]")
        if name in _PAIR_PARAMS and not (
            isinstance(v, list) and len(v) == 2 and all(_is_num(x) and x > 0 for x in v)
        ):
            raise _bad(path, field, v, "a pair of positive numbers")
        if name == "special_ids" and not (
            isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)
        ):
            raise _bad(path, field, v, "a list of token ids")


def check_counts(meta: dict, spec: Any, path: str) -> None:
    """The recorded counts and checksum list agree with the spec (a hand-edit of one but not
    the other is damage)."""
    counts = meta.get("counts")
    if counts is not None:
        want = {"n": spec.n, "num_augs": spec.num_augs, "num_classes": spec.num_classes,
                "n_chunks": spec.n_chunks}  # fmt: skip
        diff = [k for k in _COUNTS if counts.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise _bad(path, f"counts.{k}", counts.get(k), f"{want[k]} (from the spec)")
    sums = meta.get("checksums")
    if sums is not None and len(sums) != spec.n_chunks:
        raise _bad(path, "checksums", f"<{len(sums)} entries>", f"{spec.n_chunks} entries")
