"""Writing token caches: create (or resume) one with its fixed arrays laid out up front,
then write whole chunks in the crash-safe order (arrays, checksum, done flag) and finalize.
See cache/tokenstore.py for the layout and cache/tokens.py for the reader."""

from __future__ import annotations

import logging
import os
import uuid
from datetime import datetime, timezone

import numpy as np
from kdcache.cache import leftovers, remote, space
from kdcache.cache import lock as lockmod
from kdcache.cache.backends import (
    META_KEY,
    Backend,
    backend_class,
    exists,
    infer_backend,
    open_backend,
)
from kdcache.cache.errors import KdcacheError
from kdcache.cache.reader import _first, chunk_digest
from kdcache.cache.remote import is_remote, local_path
from kdcache.cache.schema import check_meta
from kdcache.cache.spec import FORMAT_VERSION, canonical_json
from kdcache.cache.tokens import TokenCache
from kdcache.cache.tokenstore import (
    TOKENS,
    check_token_spec,
    chunk_bounds,
    sample_starts,
    token_arrays,
    token_key,
)
from kdcache.cache.writer import todo_chunks

log = logging.getLogger(__name__)


class TokenWriter(TokenCache):
    """A token cache opened for writing chunks (holding the writer lock unless a joiner)."""

    def __init__(self, backend: Backend, lock: lockmod.WriterLock | None) -> None:
        super().__init__(backend)
        self.lock = lock

    def todo_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return todo_chunks(self.done(), rank, world_size)

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


# -- creation ---------------------------------------------------------------------------------
def _new_meta(spec: dict, provenance: dict | None) -> dict:
    from kdcache.cache.meta import make_provenance

    n_chunks = -(-spec["dataset"]["n"] // spec["storage"]["chunk_samples"])
    return {
        "format_version": FORMAT_VERSION,
        "kind": TOKENS,
        "spec": spec,
        "key": token_key(spec),
        "counts": {
            "n": spec["dataset"]["n"],
            "n_tokens": spec["dataset"]["n_tokens"],
            "n_chunks": n_chunks,
        },  # fmt: skip
        "provenance": make_provenance(provenance),
        "complete": False,
        "checksums": None,
    }


def _layout(spec: dict, lengths: np.ndarray) -> tuple[dict, dict]:
    """(per-token arrays name -> (shape, dtype, chunks), fixed arrays name -> data)."""
    st = spec["storage"]
    cs, tc = st["chunk_samples"], st["token_chunk"]
    bounds = chunk_bounds(lengths, cs, tc)
    total = int(bounds[-1])
    per_token = {
        name: ((total,) + shape, dt, (tc,) + shape)
        for name, (shape, dt) in token_arrays(spec).items()
    }
    n_chunks = len(bounds) - 1
    fixed = {
        "lengths": np.asarray(lengths, np.int32),
        "starts": sample_starts(lengths, bounds, cs),
        "chunk_bounds": bounds,
        "done": np.zeros(n_chunks, np.uint8),
        "checksums": np.zeros((n_chunks, 32), np.uint8),
    }
    return per_token, fixed


def _create_zarr(path, spec, meta, per_token, fixed, keys, blobs, so) -> None:
    import zarr
    from kdcache.cache.zarr_backend import _store
    from zarr.codecs import GzipCodec, ZstdCodec

    comp = {"none": None, "zstd": ZstdCodec(level=3), "gzip": GzipCodec(level=5)}
    comp = comp[spec["storage"]["compression"]]
    with remote.errors(path):
        g = zarr.open_group(_store(path, True, so), mode="w-", zarr_format=3)
        for name, (shape, dt, chunks) in per_token.items():
            g.create_array(name, shape=shape, dtype=dt, chunks=chunks, compressors=comp,
                           fill_value=0)  # fmt: skip
        for name, data in fixed.items():
            ch = (1,) + data.shape[1:] if name in ("done", "checksums") else data.shape
            a = g.create_array(name, shape=data.shape, dtype=data.dtype,
                               chunks=tuple(max(1, c) for c in ch), compressors=None,
                               fill_value=0)  # fmt: skip
            a[:] = data
        a = g.create_array("keys", shape=(len(keys),), dtype=str,
                           chunks=(max(1, min(len(keys), 1 << 20)),), compressors=None)  # fmt: skip
        a[:] = np.array(keys, dtype=object)
        for name, data in blobs.items():
            raw = np.frombuffer(data, np.uint8)
            a = g.create_array(name, shape=raw.shape, dtype=np.uint8, chunks=(max(1, raw.size),),
                               compressors=None, fill_value=0)  # fmt: skip
            a[:] = raw
        g.attrs[META_KEY] = meta


def _create_hdf5(path, spec, meta, per_token, fixed, keys, blobs) -> None:
    import h5py

    if spec["storage"]["compression"] == "zstd":
        raise KdcacheError("compression 'zstd' is not available for HDF5; use 'gzip' or 'none'")
    gz = spec["storage"]["compression"] == "gzip"
    with h5py.File(path, "w-") as f:
        for name, (shape, dt, chunks) in per_token.items():
            kw = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if gz else {}
            f.create_dataset(name, shape=shape, dtype=dt, chunks=chunks if shape[0] else None, **kw)
        for name, data in fixed.items():
            f.create_dataset(name, data=data)
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        for name, data in blobs.items():
            f.create_dataset(name, data=np.frombuffer(data, np.uint8))
        f.attrs[META_KEY] = canonical_json(meta)


def create_token_cache(
    path: str, spec: dict, *, keys: list[str], lengths: np.ndarray,
    tokenizer: dict[str, bytes] | None = None, provenance: dict | None = None,
    overwrite: bool = False, lock: bool = True, break_lock: bool = False,
    backend: str | None = None, storage_options: dict | None = None,
):  # fmt: skip
    """Create a token cache, or resume an incomplete one with an equal spec (same JSON);
    returns a TokenWriter. lock=False joins an existing cache (torchrun ranks > 0)."""
    path = local_path(os.fspath(path)).rstrip("/")
    bname = infer_backend(path, backend)
    so = storage_options
    spec = check_token_spec(spec, path)
    lengths = np.asarray(lengths, np.int64)
    if len(keys) != spec["dataset"]["n"] or len(lengths) != len(keys):
        raise KdcacheError(
            f"{len(keys)} keys / {len(lengths)} lengths; spec n is {spec['dataset']['n']}"
        )
    if (lengths < 1).any() or int(lengths.sum()) != spec["dataset"]["n_tokens"]:
        raise KdcacheError("sample lengths do not match the spec's n_tokens (or a sample is empty)")
    if is_remote(path) and bname == "hdf5":
        raise KdcacheError(f"HDF5 caches are written locally only; got {path}")
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    wlock = lockmod.acquire(path, break_lock=break_lock, storage_options=so) if lock else None
    try:
        if wlock is not None:
            leftovers.clean_cache(path)
        if exists(path, so):
            w = TokenWriter(open_backend(path, True, so), wlock)
            if w.spec == spec and not (overwrite and lock):
                log.info("resuming token cache %s: %d chunks to do", path, len(w.todo_chunks()))
                return w
            w._b.close()
            if not (overwrite and lock):
                raise KdcacheError(
                    f"cache {path} exists with a different spec (key {w.key[:12]} vs "
                    f"{token_key(spec)[:12]}); pass --overwrite to delete and recreate it"
                )
            log.warning("overwrite: deleting existing cache %s", path)
            backend_class(bname).delete(path, so)
        meta = _new_meta(spec, provenance)
        blobs = {}
        if tokenizer:
            from kdcache.cache.blobs import TOKENIZER, pack_files

            blobs[TOKENIZER], meta["tokenizer"] = pack_files(tokenizer)
        per_token, fixed = _layout(spec, lengths)
        if is_remote(path):
            _create_zarr(path, spec, meta, per_token, fixed, keys, blobs, so)
        else:
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                if bname == "zarr":
                    _create_zarr(tmp, spec, meta, per_token, fixed, keys, blobs, None)
                    os.rename(tmp, path)
                else:
                    _create_hdf5(tmp, spec, meta, per_token, fixed, keys, blobs)
                    os.link(tmp, path)
            finally:
                if os.path.exists(tmp):
                    backend_class(bname).delete(tmp)
        return TokenWriter(open_backend(path, True, so), wlock)
    except BaseException:
        if wlock is not None:
            wlock.release()
        raise
