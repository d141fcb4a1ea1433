"""Reading a cache: the Cache class and whole-cache RAM loads.

Every read returns float32 logits of width C whatever the storage (dense in any dtype, top-k,
sampled; see sparse.py), so losses and loaders never care how a cache was stored. Chunks
are checked against their sha256 when loaded for training, so a truncated or corrupt chunk
(a bad copy) is a clear error instead of silently wrong targets.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
from kdcache.cache.backends import Backend
from kdcache.cache.epoch import (  # noqa: F401 - re-exported: the reader API
    Batch,
    choose_augs,
    default_memory_budget,
    iter_epoch,
    training_source,
)
from kdcache.cache.errors import CacheCorruptError, KdcacheError
from kdcache.cache.memory import InMemoryLogits
from kdcache.cache.schema import MULTI, check_counts, check_meta
from kdcache.cache.sparse import Codec, get_codec
from kdcache.cache.spec import FORMAT_VERSION, CacheSpec

log = logging.getLogger(__name__)


def _first(idx: Any, k: int = 5) -> str:
    idx = [int(i) for i in idx]
    return f"{idx[:k]}" + (f" (+{len(idx) - k} more)" if len(idx) > k else "")


def chunk_digest(*arrays: np.ndarray) -> bytes:
    """sha256 of a chunk's stored arrays (targets then view_params), little-endian, C order."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return h.digest()


class Cache:
    """A cache opened for reading; every read returns float32 whatever the storage."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.path = backend.path
        self.backend_name = backend.name
        try:
            meta = check_meta(backend.get_meta(), self.path)
            if meta.get("kind") == MULTI:
                raise KdcacheError(
                    f"{self.path} is a multi-teacher store (members {meta.get('members')}); "
                    f"open a member as {self.path}/<member>"
                )
            if meta.get("kind") == "tokens":
                raise KdcacheError(
                    f"{self.path} is a token-level (causal-LM) cache; read it with "
                    "kdcache.cache.tokens.open_token_cache"
                )
            if meta.get("format_version") != FORMAT_VERSION:
                raise KdcacheError(
                    f"cache {self.path} has format_version {meta.get('format_version')!r}; "
                    f"this kdcache reads {FORMAT_VERSION}"
                )
            self.spec = CacheSpec.from_dict(meta["spec"])
            check_counts(meta, self.spec, self.path)
        except BaseException:
            backend.close()
            raise
        self.attrs: dict = meta
        self.key = self.spec.key()
        self.n, self.num_augs = self.spec.n, self.spec.num_augs
        self.num_classes, self.n_chunks = self.spec.num_classes, self.spec.n_chunks
        self.chunk_samples, self.dtype = self.spec.chunk_samples, self.spec.dtype
        self.codec: Codec = get_codec(self.spec)
        self.storage_kind = self.codec.kind
        self._done_cache: np.ndarray | None = None
        self._verified: set[int] = set()  # chunks checked once in this process

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.path!r}, n={self.n}, A={self.num_augs}, C={self.num_classes})"

    def refresh(self) -> dict:
        """Re-read attrs (another rank may have finalized)."""
        self.attrs = check_meta(self._b.get_meta(), self.path)
        check_counts(self.attrs, self.spec, self.path)
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
        """Done flags; a finalized cache is all done (no need to read n_chunks objects)."""
        if self._done_cache is not None:
            return self._done_cache
        if self.attrs.get("complete"):
            self._done_cache = np.ones(self.n_chunks, dtype=bool)
            return self._done_cache
        return np.asarray(self._b.read("done")).astype(bool)

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

    def checksum(self, c: int) -> bytes:
        """The recorded sha256 of chunk c (from attrs once finalized)."""
        listed = self.attrs.get("checksums") if self.is_complete() else None
        if listed and len(listed) == self.n_chunks:
            return bytes.fromhex(listed[c])
        return bytes(np.asarray(self._b.read("checksums", c, c + 1), dtype=np.uint8)[0])

    def read_chunk_stored(self, c: int, verify: bool = False) -> dict[str, np.ndarray]:
        """A chunk's stored target arrays (name -> array); verify=True checks the checksum the
        first time a chunk is read by this Cache (later epochs skip the sha256)."""
        if verify and int(c) not in self._verified:
            return self.read_chunk_verified(c)[0]
        return self._read_names(c, self.codec.names)

    def read_chunk_verified(self, c: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(stored target arrays, view_params) of chunk c; CacheCorruptError unless they match
        the recorded checksum (what copies, merges and training loads rely on)."""
        arrays = self._read_names(c, self.codec.names + ("view_params",))
        vp = arrays.pop("view_params").astype(np.float32, copy=False)
        if chunk_digest(*arrays.values(), vp) != self.checksum(c):
            start, stop = self.chunk_range(c)
            raise CacheCorruptError(
                f"chunk {c} (samples {start}..{stop - 1}) of {self.path} fails its checksum "
                "(corrupt or truncated copy); pull/copy the cache again"
            )
        if self.is_complete():
            self._verified.add(int(c))
        return arrays, vp

    def _read_names(self, c: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        start, stop = self.chunk_range(c)
        if not self.is_complete() and not self._chunk_done(c):
            raise KdcacheError(f"chunk {c} of {self.path} is not written yet")
        try:
            return {k: np.asarray(self._b.read(k, start, stop)) for k in names}
        except KdcacheError:
            raise
        except Exception as e:  # noqa: BLE001 - codecs raise many types on truncated data
            why = (str(e).splitlines() or [""])[0].split(". ")[0][:80]
            raise CacheCorruptError(
                f"chunk {c} of {self.path} is unreadable, truncated or corrupt "
                f"({type(e).__name__}: {why}); pull/copy the cache again"
            ) from None

    def read_chunk_raw(self, c: int) -> np.ndarray:
        """A dense chunk's logits in the stored dtype (uint16 bits for bfloat16)."""
        if self.storage_kind != "dense":
            raise KdcacheError(f"{self.path} is a {self.storage_kind} cache; use read_chunk")
        return self.read_chunk_stored(c)["logits"]

    def read_chunk(self, c: int) -> np.ndarray:
        """A chunk's logits (n, A, C) float32 (rebuilt full width for sparse caches)."""
        return self.codec.decode(self.read_chunk_stored(c))

    def decode_rows(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        return self.codec.decode(rows)

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
        rows = {k: np.asarray(self._b.read_rows(k, uniq))[inv, a] for k in self.codec.names}
        return self.codec.decode(rows)

    def entry_bytes(self) -> int:
        """Stored bytes per (sample, aug) entry, uncompressed."""
        return self.codec.entry_bytes()

    def nbytes(self) -> int:
        """Bytes of the stored targets in RAM (what load() needs)."""
        return self.n * self.num_augs * self.entry_bytes()

    def dense_nbytes(self) -> int:
        """Bytes of all logits as float32 (what a full-width decode needs)."""
        return self.n * self.num_augs * self.num_classes * 4

    def load(self, memory_budget: int | None = None, verify: bool = True) -> InMemoryLogits:
        """Whole cache in RAM (stored form), read and checksum-verified chunk by chunk;
        KdcacheError over budget."""
        self.require_complete()
        need = self.nbytes()
        if memory_budget is not None and need > memory_budget:
            raise KdcacheError(
                f"cache {self.path} needs {need} bytes of RAM, over the memory budget of "
                f"{memory_budget}; use the chunk-aware reader (iter_epoch) instead"
            )
        arrays: dict[str, np.ndarray] = {}
        for c in range(self.n_chunks):
            start, stop = self.chunk_range(c)
            for k, v in self.read_chunk_stored(c, verify=verify).items():
                if k not in arrays:
                    arrays[k] = np.empty((self.n,) + v.shape[1:], dtype=v.dtype)
                arrays[k][start:stop] = v
        return InMemoryLogits(
            arrays, self.dtype, chunk_samples=self.chunk_samples, codec=self.codec
        )

    def blobs(self) -> dict[str, bytes]:
        """Verified files stored in the cache, as blobs by array name (copies carry them)."""
        meta = self.attrs.get("tokenizer")
        if meta is None:
            return {}
        from kdcache.cache.blobs import TOKENIZER, unpack_files

        blob = self._b.read_blob(TOKENIZER)
        unpack_files(blob, meta, self.path)
        return {TOKENIZER: blob}

    def tokenizer_files(self) -> dict[str, bytes] | None:
        """The text teacher's tokenizer files stored in the cache (None: not a text cache,
        or made before tokenizers were stored)."""
        meta = self.attrs.get("tokenizer")
        if meta is None:
            return None
        from kdcache.cache.blobs import TOKENIZER, unpack_files

        return unpack_files(self._b.read_blob(TOKENIZER), meta, self.path)

    def structure_problems(self) -> list[str]:
        """The cheap structural checks of `verify` (no chunk reads): every array has the
        shape and stored dtype the spec implies, and the attrs key is the spec's key."""
        from kdcache.cache.backends import layout

        problems = []
        targets = self.codec.layout()
        for name, (shape, dtype, _chunks) in layout(self.spec).items():
            try:
                got, got_dtype = self._b.shape(name), self._b.stored_dtype(name)
            except KdcacheError as e:
                problems.append(str(e))
                continue
            if got != shape:
                problems.append(f"array {name} has shape {got}; spec says {shape}")
            want = targets[name][2] if name in targets else np.dtype(dtype).name
            if name == "keys":
                want = "str"
            if got_dtype != want:
                problems.append(f"array {name} has dtype {got_dtype}; spec says {want}")
        if self.attrs.get("key") != self.key:
            have = self.attrs.get("key")
            problems.append(f"attrs key {have} != key of the stored spec {self.key}")
        return problems

    def check_structure(self) -> None:
        """CacheCorruptError naming the first problems of structure_problems(); run whenever a
        cache is opened to be used, so hand-edited attrs never give silently wrong targets."""
        problems = self.structure_problems()
        if problems:
            more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
            raise CacheCorruptError(
                f"cache {self.path} does not match its own spec: {'; '.join(problems[:2])}{more}; "
                "`cache verify` lists everything; pull/copy the cache again"
            )

    def close(self) -> None:
        self._b.close()
