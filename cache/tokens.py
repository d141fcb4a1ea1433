"""Reading (and writing) token-level caches: the reader contract of causal-LM caches.

``c.tokens(row)`` -> (input_ids (T,), ids (T,K), logprobs (T,K) float32, tail (T,) float32)
for top-k caches, (input_ids, ids, counts (T,K) float32, None) for sampled ones. Position t is
the teacher's next-token distribution after input_ids[:t+1]. numpy only (no torch in cache/).
"""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import datetime, timezone
from typing import Any

import numpy as np
from kdcache.cache import lock as lockmod
from kdcache.cache import space
from kdcache.cache.backends import Backend, open_backend
from kdcache.cache.dtypes import decode
from kdcache.cache.errors import CacheCorruptError, KdcacheError
from kdcache.cache.reader import _first, chunk_digest
from kdcache.cache.schema import check_meta
from kdcache.cache.tokenstore import (
    TOKENS,
    check_token_spec,
    id_packing,
    token_arrays,
    token_key,
    unpack_ids,
)

log = logging.getLogger(__name__)


def is_token_cache(path: str, storage_options: dict | None = None) -> bool:
    """Whether `path` holds a token cache (reads the attrs only)."""
    try:
        b = open_backend(os.fspath(path), False, storage_options)
    except KdcacheError:
        return False
    try:
        meta = b.get_meta()
        return isinstance(meta, dict) and meta.get("kind") == TOKENS
    except KdcacheError:
        return False
    finally:
        b.close()


def open_token_cache(
    path: str, storage_options: dict | None = None, *, allow_incomplete: bool = False
) -> TokenCache:
    """Open a token cache read-only; refuses an incomplete one unless allow_incomplete."""
    c = TokenCache(open_backend(os.fspath(path), False, storage_options))
    if not allow_incomplete and not c.is_complete():
        miss = c.missing_chunks()
        c.close()
        raise KdcacheError(
            f"token cache {path} is incomplete ({len(miss)} of {c.n_chunks} chunks not done "
            f"{_first(miss)}); rerun the same precompute command to finish it"
        )
    return c


class TokenCache:
    """A token cache opened for reading."""

    kind = TOKENS

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.path = backend.path
        self.backend_name = backend.name
        self._tokdir: Any = None
        try:
            meta = check_meta(backend.get_meta(), self.path)
            if meta.get("kind") != TOKENS:
                raise KdcacheError(f"{self.path} is not a token cache")
            self.spec = check_token_spec(meta["spec"], self.path)
            self.key = token_key(self.spec)
            if meta["key"] != self.key:
                raise CacheCorruptError(
                    f"{self.path}: attrs key {meta['key'][:12]} does not match its spec "
                    f"({self.key[:12]}); the attrs were edited"
                )
            self._starts = np.asarray(backend.read("starts"), np.int64)
            self._lengths = np.asarray(backend.read("lengths"), np.int64)
            self.chunk_bounds = np.asarray(backend.read("chunk_bounds"), np.int64)
        except BaseException:
            backend.close()
            raise
        self.attrs = meta
        t = self.spec["tokens"]
        self.mode, self.k, self.vocab_size = t["mode"], t["k"], t["vocab_size"]
        self.max_length, self.dtype, self.top_p = t["max_length"], t["dtype"], t.get("top_p")
        self.chunk_samples = self.spec["storage"]["chunk_samples"]
        self.n = len(self._lengths)
        self.n_chunks = len(self.chunk_bounds) - 1
        self.n_tokens = int(self._lengths.sum())
        self.packing = id_packing(self.vocab_size)
        self.names = tuple(token_arrays(self.spec))
        self.offsets = np.concatenate([[0], np.cumsum(self._lengths)]).astype(np.int64)
        if self.n != self.spec["dataset"]["n"] or self.n_tokens != self.spec["dataset"]["n_tokens"]:
            backend.close()
            raise CacheCorruptError(f"{self.path}: lengths do not match the spec's n/n_tokens")
        self._keys: list[str] | None = None

    # -- basics ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> TokenCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TokenCache({self.path!r}, n={self.n}, tokens={self.n_tokens}, "
                f"{self.mode}={self.k}, V={self.vocab_size})")  # fmt: skip

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = list(self._b.read("keys"))
        return self._keys

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths.copy()

    def num_tokens(self, row: int) -> int:
        return int(self._lengths[self._row(row)])

    def is_complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def done(self) -> np.ndarray:
        if self.is_complete():
            return np.ones(self.n_chunks, bool)
        return np.asarray(self._b.read("done")).astype(bool)

    def missing_chunks(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(~self.done())]

    def chunk_rows(self, c: int) -> tuple[int, int]:
        """Sample rows [start, stop) of chunk c."""
        if not 0 <= c < self.n_chunks:
            raise KdcacheError(f"chunk {c} out of range [0, {self.n_chunks})")
        lo = c * self.chunk_samples
        return lo, min(lo + self.chunk_samples, self.n)

    def _row(self, row: Any) -> int:
        r = int(row)
        if not 0 <= r < self.n:
            raise KdcacheError(f"row {row!r} out of range [0, {self.n}) of {self.path}")
        return r

    # -- reads ----------------------------------------------------------------------------
    def _read_span(self, lo: int, hi: int, names: tuple[str, ...] | None = None) -> dict:
        return {n: np.asarray(self._b.read(n, lo, hi)) for n in (names or self.names)}

    def _decode(self, raw: dict) -> tuple:
        ids = unpack_ids(raw, self.packing, self.k)
        input_ids = raw["input_ids"].astype(np.int64)
        if self.mode == "topk":
            return (input_ids, ids, decode(raw["logprobs"], self.dtype),
                    decode(raw["tail"], self.dtype))  # fmt: skip
        return input_ids, ids, raw["counts"].astype(np.float32), None

    def tokens(self, row: int) -> tuple:
        """(input_ids, ids, logprobs|counts, tail|None) of one sample, see the module doc."""
        r = self._row(row)
        lo = int(self._starts[r])
        return self._decode(self._read_span(lo, lo + int(self._lengths[r])))

    def loss_mask(self, row: int) -> np.ndarray:
        r = self._row(row)
        lo = int(self._starts[r])
        return np.asarray(self._b.read("loss_mask", lo, lo + int(self._lengths[r]))).astype(bool)

    def batch(self, rows: Any) -> tuple:
        """(input_ids, ids, values, tail|None, lengths) of several rows, concatenated in the
        order given; the rows of one chunk cost one span read per array."""
        rows = np.asarray([self._row(r) for r in np.atleast_1d(rows)], np.int64)
        return (*self._decode(self.batch_raw(rows)), self._lengths[rows].copy())

    def batch_mask(self, rows: Any) -> np.ndarray:
        """The loss masks of several rows, concatenated like batch()."""
        rows = np.asarray([self._row(r) for r in np.atleast_1d(rows)], np.int64)
        return self.batch_raw(rows, ("loss_mask",))["loss_mask"].astype(bool)

    def batch_raw(self, rows: np.ndarray, names: tuple[str, ...] | None = None) -> dict:
        """Stored arrays of `rows` (concatenated in order), one span read per chunk."""
        names = names or self.names
        pieces: list[tuple[int, dict]] = []
        chunks = rows // self.chunk_samples
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            rs = rows[sel]
            lo = int(self._starts[rs].min())
            hi = int((self._starts[rs] + self._lengths[rs]).max())
            span = self._read_span(lo, hi, names)
            for j, r in zip(sel, rs, strict=True):
                a = int(self._starts[r]) - lo
                pieces.append((int(j), {n: span[n][a : a + int(self._lengths[r])] for n in names}))
        pieces.sort(key=lambda p: p[0])
        return {n: np.concatenate([d[n] for _j, d in pieces]) for n in names}

    # -- integrity ------------------------------------------------------------------------
    def read_chunk_stored(self, c: int, verify: bool = False) -> dict[str, np.ndarray]:
        """The stored (padded) arrays of chunk c; verify=True checks its sha256."""
        self.chunk_rows(c)
        lo, hi = int(self.chunk_bounds[c]), int(self.chunk_bounds[c + 1])
        raw = self._read_span(lo, hi)
        if verify and chunk_digest(*(raw[n] for n in self.names)) != self.checksum(c):
            raise CacheCorruptError(
                f"chunk {c} of {self.path} fails its sha256 checksum (corrupt or truncated "
                "copy); pull or precompute it again"
            )
        return raw

    def checksum(self, c: int) -> bytes:
        sums = self.attrs.get("checksums")
        if sums:
            return bytes.fromhex(sums[c])
        return bytes(np.asarray(self._b.read("checksums", c, c + 1), np.uint8)[0])

    def verify(self, chunks: Any = None) -> dict:
        """Checksums of done chunks and NaN in stored values: {"ok", "chunks_checked",
        "bad_chunks", "missing_chunks", "problems"}."""
        done = self.done()
        bad, problems, checked = [], [], 0
        for c in range(self.n_chunks) if chunks is None else chunks:
            if not done[c]:
                continue
            checked += 1
            try:
                raw = self.read_chunk_stored(c, verify=True)
            except CacheCorruptError as e:
                bad.append(int(c))
                problems.append(str(e))
                continue
            if self.mode == "topk" and np.isnan(decode(raw["logprobs"], self.dtype)).any():
                bad.append(int(c))
                problems.append(f"chunk {c}: NaN in logprobs")
        missing = [int(c) for c in np.flatnonzero(~done)]
        if missing:
            problems.append(f"{len(missing)} chunks not done {_first(missing)}")
        return {"ok": not bad and not missing, "chunks_checked": checked, "bad_chunks": bad,
                "missing_chunks": missing, "problems": problems}  # fmt: skip

    # -- tokenizer ------------------------------------------------------------------------
    def tokenizer_files(self) -> dict[str, bytes] | None:
        from kdcache.cache.blobs import TOKENIZER, unpack_files

        meta = self.attrs.get("tokenizer")
        if meta is None:
            return None
        return unpack_files(self._b.read_blob(TOKENIZER), meta, self.path)

    def tokenizer_dir(self) -> str:
        """A local directory with the teacher's tokenizer files (kept while the cache is open)."""
        if self._tokdir is None:
            files = self.tokenizer_files()
            if not files:
                raise KdcacheError(f"{self.path} stores no tokenizer")
            self._tokdir = tempfile.TemporaryDirectory(prefix="kdcache-tok-")
            for name, data in files.items():
                with open(os.path.join(self._tokdir.name, name), "wb") as f:
                    f.write(data)
        return self._tokdir.name

    def size_bytes(self) -> int | None:
        return self._b.size_bytes()

    def close(self) -> None:
        if self._tokdir is not None:
            self._tokdir.cleanup()
            self._tokdir = None
        self._b.close()


class TokenWriter(TokenCache):
    """A token cache opened for writing chunks (holding the writer lock unless a joiner)."""

    def __init__(self, backend: Backend, lock: lockmod.WriterLock | None) -> None:
        super().__init__(backend)
        self.lock = lock

    def todo_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        done = self.done()
        return [c for c in range(self.n_chunks) if not done[c] and c % world_size == rank]

    def write_chunk(self, c: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk c's per-token arrays (unpadded, stored dtypes) padded to its token
        range, in the crash-safe order: arrays, checksum, done flag."""
        if self.attrs.get("complete"):
            raise KdcacheError(f"cache {self.path} is finalized; refusing to write chunk {c}")
        if set(arrays) != set(self.names):
            raise KdcacheError(
                f"chunk {c} has arrays {sorted(arrays)}; expected {sorted(self.names)}"
            )
        lo, hi = self.chunk_rows(c)
        t0, t1 = int(self.chunk_bounds[c]), int(self.chunk_bounds[c + 1])
        want = int(self._lengths[lo:hi].sum())
        padded = {}
        for n, (s, dt) in token_arrays(self.spec).items():
            a = np.asarray(arrays[n])
            if a.shape != (want,) + s or a.dtype != np.dtype(dt):
                raise KdcacheError(
                    f"chunk {c} array {n} is {a.shape} {a.dtype}; expected {(want,) + s} "
                    f"{np.dtype(dt)}"
                )
            p = np.zeros((t1 - t0,) + s, dt)
            p[:want] = a
            padded[n] = p
        digest = chunk_digest(*(padded[n] for n in self.names))
        need = sum(p.nbytes for p in padded.values())
        space.require_space(self.path, need, f"chunk {c}", "every finished chunk is kept")
        if bool(np.asarray(self._b.read("done", c, c + 1))[0]):
            self._b.write("done", c, np.zeros(1, np.uint8))
            self._b.flush()
        for n in self.names:
            self._b.write(n, t0, padded[n])
        self._b.write("checksums", c, np.frombuffer(digest, np.uint8)[None, :])
        self._b.flush()
        self._b.write("done", c, np.ones(1, np.uint8))
        self._b.flush()

    def write_chunk_stored(self, c: int, padded: dict[str, np.ndarray]) -> None:
        """Write a chunk read with read_chunk_stored (copies, merges): same checks, digest,
        crash-safe order."""
        want = int(self._lengths[slice(*self.chunk_rows(c))].sum())
        self.write_chunk(c, {n: np.asarray(a)[:want] for n, a in padded.items()})

    def finalize(self, extra: dict | None = None) -> None:
        """All chunks done: checksums + complete into attrs (written last), release the lock."""
        meta = check_meta(self._b.get_meta(), self.path)
        if not meta.get("complete"):
            miss = np.flatnonzero(~np.asarray(self._b.read("done")).astype(bool))
            if len(miss):
                raise KdcacheError(
                    f"cannot finalize {self.path}: {len(miss)} of {self.n_chunks} chunks not "
                    f"done {_first(miss)}"
                )
            sums = np.asarray(self._b.read("checksums"), np.uint8)
            meta["checksums"] = [bytes(r).hex() for r in sums]
            meta.update(extra or {})
            meta["complete"] = True
            meta["finalized_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._b.set_meta(meta)
            self._b.flush()
            self.attrs = meta
        self.close()

    def close(self) -> None:
        super().close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
