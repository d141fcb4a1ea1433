"""`kdcache.open_cache`: a read-only teacher cache for any training loop.

One object for every storage (dense fp16/bf16/fp32, top-k, sampled) and for a multi-teacher
store (its members, or their ensemble): `logits()` is always float32 of full width C. Every
chunk is checked against its sha256 the first time it is read, so a corrupt copy is a
`KdcacheError` (the CLI's one-line message), never silently wrong targets. No torch at import
time (cache/ layering): tensors are made inside `logits()`.
"""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from kdcache.cache.ensemble import ENSEMBLES, combine
from kdcache.cache.errors import KdcacheError
from kdcache.cache.memory import InMemoryLogits
from kdcache.cache.reader import Cache
from kdcache.cache.spec import CacheSpec

if TYPE_CHECKING:
    import torch
    from kdcache.cache.tokens import TokenCache

_CHUNKS_KEPT = 8  # verified chunks kept decoded-ready per member (random reads stay cheap)


class TeacherCache:
    """A complete cache opened read-only. Rows are cache rows (`keys[r]` names the sample;
    under `spec.dataset.order` rows are a permutation of the dataset), views are the A cached
    views per row (view 0 is the eval view when the cache has an identity view)."""

    def __init__(
        self,
        members: list[Cache],
        path: str,
        names: list[str],
        ensemble: str,
        storage_options: dict | None = None,
    ) -> None:
        if ensemble not in ENSEMBLES:
            raise KdcacheError(f"unknown ensemble {ensemble!r}; expected {' or '.join(ENSEMBLES)}")
        self._members, self.path, self.members = members, path, names
        self.ensemble = ensemble
        first = members[0]
        self.spec: CacheSpec = first.spec
        self.key: str = first.key if len(members) == 1 else "+".join(c.key for c in members)
        self.num_views: int = first.num_augs
        self.num_classes: int = first.num_classes
        self.storage_kind: str = first.storage_kind
        self._ram: list[InMemoryLogits] | None = None
        self._vp: np.ndarray | None = None
        self._chunks: list[collections.OrderedDict] = [collections.OrderedDict() for _ in members]
        self._labels: np.ndarray | None = None
        self._keys: list[str] | None = None
        self._so = storage_options

    # --- what the cache is ---
    def __len__(self) -> int:
        return self.spec.n

    def __repr__(self) -> str:
        more = f", members={self.members}" if len(self.members) > 1 else ""
        return (
            f"TeacherCache({self.path!r}, rows={len(self)}, views={self.num_views}, "
            f"classes={self.num_classes}, storage={self.storage_kind}{more})"
        )

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:  # DataLoader workers (fork or spawn) reopen the store
        state = dict(self.__dict__)
        state["_members"] = None
        state["_chunks"] = [collections.OrderedDict() for _ in self.members]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._members is None:
            from kdcache.cache.store import open_members

            self._members = open_members(self.path, self._so, check=False)

    @property
    def attrs(self) -> dict:
        """The stored `kdcache` attrs (spec, provenance, checksums) of the first member."""
        return self._members[0].attrs

    @property
    def keys(self) -> list[str]:
        """The sample key of every row (stored in the cache)."""
        if self._keys is None:
            self._keys = [str(k) for k in self._members[0].keys()]
        return self._keys

    @property
    def labels(self) -> np.ndarray:
        """The label of every row, int64 (N,)."""
        if self._labels is None:
            self._labels = self._members[0].labels()
        return self._labels

    def tokenizer_files(self) -> dict[str, bytes] | None:
        """The text teacher's tokenizer files stored in the cache (None for images)."""
        return self._members[0].tokenizer_files()

    # --- reads ---
    def _index(self, rows: Any, views: Any) -> tuple[np.ndarray, np.ndarray, tuple]:
        r = np.asarray(rows, dtype=np.int64)
        if views is None:
            shape = r.shape + (self.num_views,)
            rr = np.repeat(r.reshape(-1), self.num_views)
            vv = np.tile(np.arange(self.num_views), r.size)
            return rr, vv, shape
        v = np.asarray(views, dtype=np.int64)
        try:
            r, v = np.broadcast_arrays(r, v)
        except ValueError:
            raise KdcacheError(
                f"rows {r.shape} and views {v.shape} do not broadcast; expected views of the "
                "same shape as rows, one view for all, or None (every view)"
            ) from None
        rr, vv = r.reshape(-1), v.reshape(-1)
        if rr.size and (rr.min() < 0 or rr.max() >= len(self)):
            bad = rr[(rr < 0) | (rr >= len(self))][:5].tolist()
            raise KdcacheError(f"rows {bad} out of range; expected 0..{len(self) - 1}")
        if vv.size and (vv.min() < 0 or vv.max() >= self.num_views):
            bad = vv[(vv < 0) | (vv >= self.num_views)][:5].tolist()
            raise KdcacheError(f"views {bad} out of range; expected 0..{self.num_views - 1}")
        return rr, vv, r.shape

    def _chunk(self, m: int, c: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stored arrays + view params of chunk c of member m, checksum-verified once."""
        kept = self._chunks[m]
        if c in kept:
            kept.move_to_end(c)
            return kept[c]
        kept[c] = self._members[m].read_chunk_verified(c)
        if len(kept) > _CHUNKS_KEPT:
            kept.popitem(last=False)
        return kept[c]

    def _gather(self, m: int, rows: np.ndarray, views: np.ndarray, what: str) -> np.ndarray:
        cs = self.spec.chunk_samples
        chunk_of = rows // cs
        out = None
        for c in np.unique(chunk_of):
            sel = np.flatnonzero(chunk_of == c)
            arrays, vp = self._chunk(m, int(c))
            local = rows[sel] - int(c) * cs
            if what == "params":
                part = vp[local, views[sel]]
            else:
                part = self._members[m].decode_rows(
                    {k: a[local, views[sel]] for k, a in arrays.items()}
                )
            if out is None:
                out = np.empty((rows.size,) + part.shape[1:], dtype=np.float32)
            out[sel] = part
        if out is None:
            width = self.num_classes if what == "logits" else self.spec.param_dim
            out = np.empty((0, width), dtype=np.float32)
        return out

    def logits_numpy(self, rows: Any, views: Any = None, member: int | str | None = None):
        """`logits()` as a float32 numpy array (what DataLoader workers collate cheaply)."""
        rr, vv, shape = self._index(rows, views)
        ms = range(len(self._members)) if member is None else [self._member_index(member)]
        parts = []
        for m in ms:
            if self._ram is not None:
                parts.append(self._ram[m].read(rr, vv))
            else:
                parts.append(self._gather(m, rr, vv, "logits"))
        out = combine(parts, self.ensemble)
        return np.ascontiguousarray(out, dtype=np.float32).reshape(shape + (self.num_classes,))

    def logits(self, rows: Any, views: Any = None, member: int | str | None = None) -> torch.Tensor:
        """Teacher logits, float32 torch tensor of full width C whatever the storage.

        rows: int or array of cache rows; views: the view of each row (broadcast with rows),
        or None for every view (adds an A axis). Shape: rows' shape (+ A) + (C,). A
        multi-teacher store gives the ensemble of its members (`ensemble=` of open_cache),
        or one member with `member=` (its index or name)."""
        import torch

        return torch.from_numpy(self.logits_numpy(rows, views, member))

    def view_params(self, rows: Any, views: Any = None) -> np.ndarray:
        """The stored view parameters (float32, shape rows (+ A) + (P,)): what replays the
        exact pixels/tokens the teacher saw (`kdcache list views` gives the layout)."""
        rr, vv, shape = self._index(rows, views)
        if self._vp is not None:
            out = self._vp[rr, vv]
        else:
            out = self._gather(0, rr, vv, "params")
        return out.reshape(shape + (self.spec.param_dim,))

    def _member_index(self, member: int | str) -> int:
        if isinstance(member, str):
            if member not in self.members:
                raise KdcacheError(f"no member {member!r}; expected one of {self.members}")
            return self.members.index(member)
        if not 0 <= int(member) < len(self._members):
            raise KdcacheError(f"member {member} out of range 0..{len(self._members) - 1}")
        return int(member)

    def load(self, memory_budget_gb: float | None = None) -> TeacherCache:
        """Read every chunk (checksum-verified) into RAM in its stored form; later reads are
        RAM gathers. KdcacheError when it needs more than `memory_budget_gb`."""
        budget = None if memory_budget_gb is None else int(memory_budget_gb * (1 << 30))
        need = sum(c.nbytes() for c in self._members)
        if budget is not None and need > budget:
            raise KdcacheError(
                f"cache {self.path} needs {need} bytes of RAM, over the memory budget of "
                f"{budget}; read it chunk by chunk (ChunkSampler) instead"
            )
        self._ram = [c.load(None) for c in self._members]
        self._vp = self._members[0].view_params()
        return self

    def nbytes(self) -> int:
        """Bytes `load()` needs (all members, stored form)."""
        return sum(c.nbytes() for c in self._members)

    def verify(self) -> list[str]:
        """Every problem `kdcache cache verify` finds (empty list: sound). Reads every chunk."""
        from kdcache.cache.verify import verify

        return verify(self.path, storage_options=self._so)

    def close(self) -> None:
        for c in self._members or ():
            c.close()


def open_cache(
    path_or_url: str | os.PathLike,
    storage_options: dict | None = None,
    *,
    ensemble: str = "mean-logits",
) -> TeacherCache | TokenCache:
    """Open a complete teacher cache (local path or fsspec URL) read-only; never writes.

    Not a cache, an incomplete cache, or one whose arrays disagree with its own spec raises
    `KdcacheError` with the CLI's one-line message; corrupt chunks raise `CacheCorruptError`
    (a KdcacheError) when first read. A multi-teacher store (`cache merge`) opens as the
    `ensemble` of its members. A token-level (causal-LM) cache opens as a `TokenCache`:
    `.tokens(row)` -> (input_ids (T,), ids (T,K) int64, logprobs (T,K) float32, tail (T,))
    for top-k caches, (input_ids, ids, counts (T,K) float32, None) for sampled ones."""
    from kdcache.cache.store import open_members, read_meta

    path = os.fspath(path_or_url)
    so = storage_options or None
    meta = read_meta(path, so)
    if meta.get("kind") == "tokens":  # a causal-LM cache: c.tokens(row), c.batch(rows)
        from kdcache.cache.tokens import open_token_cache

        return open_token_cache(path, so)
    members = open_members(path, so)
    try:
        for c in members:
            c.require_complete()
        names = list(meta.get("members") or [path])
        tc = TeacherCache(members, path, names, ensemble, so)
    except BaseException:
        for c in members:
            c.close()
        raise
    return tc
