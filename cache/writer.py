"""A cache opened for writing: validate a chunk, convert it to the storage form, write it in
the crash-safe order (arrays, checksum, done flag), finalize; full disks stop cleanly."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np
from kdcache.cache import leftovers, space
from kdcache.cache import lock as lockmod
from kdcache.cache.backends import Backend, decode
from kdcache.cache.errors import KdcacheError
from kdcache.cache.reader import Cache, _first, chunk_digest

log = logging.getLogger(__name__)


def todo_chunks(done, rank: int = 0, world_size: int = 1) -> list[int]:
    """The chunks not done yet that rank `rank` of `world_size` writes (c % world == rank;
    the same rule for torchrun ranks and --shard I/N, for class and token caches)."""
    if not 0 <= rank < world_size:
        raise KdcacheError(f"rank {rank} out of range for world_size {world_size}")
    return [c for c in range(len(done)) if not done[c] and c % world_size == rank]


class CacheWriter(Cache):
    """A cache opened for writing chunks; optionally holding the writer lock."""

    def __init__(self, backend: Backend, lock: lockmod.WriterLock | None) -> None:
        super().__init__(backend)
        self.lock = lock

    def todo_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return todo_chunks(self.done(), rank, world_size)

    def write_chunk(
        self, c: int, logits: np.ndarray, view_params: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Validate everything, convert dense logits to the storage form (dtype, top-k,
        sampled), then write arrays, checksum, done flag; returns the stored arrays."""
        start, stop = self.chunk_range(c)
        n_c = stop - start
        logits = np.asarray(logits)
        view_params = np.asarray(view_params)
        want = (n_c, self.num_augs, self.num_classes)
        if logits.shape != want:
            raise KdcacheError(f"logits for chunk {c} have shape {logits.shape}; expected {want}")
        if not np.issubdtype(logits.dtype, np.floating):
            raise KdcacheError(f"logits have dtype {logits.dtype}; expected a float dtype")
        want_vp = (n_c, self.num_augs, self.spec.param_dim)
        if view_params.shape != want_vp:
            raise KdcacheError(
                f"view_params for chunk {c} have shape {view_params.shape}; expected {want_vp}"
            )
        for name, arr in (("logits", logits), ("view_params", view_params)):
            bad = ~np.isfinite(arr.reshape(n_c, -1)).all(axis=1)
            if bad.any():
                where = _first(np.flatnonzero(bad) + start)
                raise KdcacheError(
                    f"NaN/Inf in {name} of chunk {c} at samples {where}; nothing written"
                )
        arrays = self.codec.encode(np.asarray(logits, dtype=np.float32), start)
        for name in self.codec.value_names():
            vals = decode(arrays[name], self.dtype).reshape(n_c, -1)
            bad = ~np.isfinite(vals).all(axis=1)
            if bad.any():
                raise KdcacheError(
                    f"logits of chunk {c} overflow {self.dtype} at samples "
                    f"{_first(np.flatnonzero(bad) + start)}; use storage dtype float32 or bfloat16"
                )
        vp = np.ascontiguousarray(view_params, dtype=np.float32)
        digest = chunk_digest(*(arrays[k] for k in self.codec.names), vp)
        self.write_chunk_stored(c, arrays, vp, digest)
        return arrays

    def write_chunk_raw(self, c: int, raw: np.ndarray, vp: np.ndarray, digest: bytes) -> None:
        """Dense form of write_chunk_stored (the stored-dtype logits of chunk c)."""
        self.write_chunk_stored(c, {"logits": raw}, vp, digest)

    def write_chunk_stored(
        self, c: int, arrays: dict[str, np.ndarray], vp: np.ndarray, digest: bytes
    ) -> None:
        """Write validated stored arrays in the crash-safe order: arrays, checksum, done flag
        (used by write_chunk, merge, copy and convert)."""
        if self.attrs.get("complete"):
            raise KdcacheError(f"cache {self.path} is finalized; refusing to write chunk {c}")
        if set(arrays) != set(self.codec.names):
            raise KdcacheError(
                f"chunk {c} has arrays {sorted(arrays)}; cache {self.path} stores "
                f"{sorted(self.codec.names)}"
            )
        start, _stop = self.chunk_range(c)
        need = sum(a.nbytes for a in arrays.values()) + vp.nbytes + len(digest)
        space.require_space(self.path, need, f"chunk {c}", self._kept())
        try:
            self._write_ordered(c, start, arrays, vp, digest)
        except Exception as e:
            if not space.is_enospc(e):
                raise
            kept = self._kept()
            self._b.abandon()  # never flush half-written state over the consistent one
            raise space.disk_full(self.path, f"chunk {c}", kept) from None

    def _write_ordered(
        self, c: int, start: int, arrays: dict[str, np.ndarray], vp: np.ndarray, digest: bytes
    ) -> None:
        if self._chunk_done(c):  # rewriting: clear the flag first so a crash cannot leave it
            self._b.write("done", c, np.zeros(1, np.uint8))
            self._b.flush()
            for name in self.codec.names + ("view_params",):
                self._b.discard(name, start)
        for name in self.codec.names:
            self._b.write(name, start, arrays[name])
        self._b.write("view_params", start, vp)
        self._b.write("checksums", c, np.frombuffer(digest, np.uint8)[None, :])
        self._b.flush()
        self._b.write("done", c, np.ones(1, np.uint8))
        self._b.flush()

    def _kept(self) -> str:
        try:
            done = int(np.asarray(self._b.read("done")).astype(bool).sum())
        except Exception:  # noqa: BLE001 - only for the message
            return "every finished chunk is kept"
        return f"the {done} finished chunks of {self.n_chunks} are kept"

    def finalize(self, extra: dict | None = None) -> None:
        """Once all chunks are done: checksums + complete into attrs (written last), then
        release the lock. `extra` adds attrs (e.g. a conversion's KL report)."""
        meta = self.refresh()
        if not meta.get("complete"):
            miss = self.missing_chunks()
            if miss:
                raise KdcacheError(
                    f"cannot finalize {self.path}: {len(miss)} of {self.n_chunks} chunks not done "
                    f"{_first(miss)}"
                )
            sums = np.asarray(self._b.read("checksums"), dtype=np.uint8)
            meta["checksums"] = [bytes(row).hex() for row in sums]
            meta.update(extra or {})
            meta["complete"] = True
            meta["finalized_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._b.set_meta(meta)
            self._b.flush()
            self.attrs = meta
            log.info("finalized cache %s (%d chunks)", self.path, self.n_chunks)
        if self.lock is not None:  # every writer has finished: nothing of theirs is in flight
            leftovers.zarr_partials(self.path)
        if self.lock is not None:
            self.lock.release()

    def close(self) -> None:
        super().close()
        if self.lock is not None:
            self.lock.release()
