"""Token-level caches (causal-LM teachers): spec, layout, id packing, create and write.

A row is a ragged run of T_i tokens. Every per-token array is flat along one token axis;
sample-chunk c (``chunk_samples`` whole samples) owns the token range
``chunk_bounds[c]:chunk_bounds[c+1]``, padded to a multiple of the token-axis storage chunk,
so two sample-chunks never share a storage object (ranks and resumed runs never touch each
other's bytes). Everything that depends only on the data (keys, per-sample ``starts`` and
``lengths``, ``chunk_bounds``) is written when the cache is created; a chunk's per-token
arrays are written whole, then its checksum, then its done flag (the crash-safe order of
classification caches). Vocabulary ids are packed like Megatron's: uint16 when V <= 65536,
uint16 low bits + one bit plane (17 bits) when V <= 131072, int32 beyond.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from typing import Any

import numpy as np
from kdcache.cache import leftovers, remote
from kdcache.cache import lock as lockmod
from kdcache.cache.backends import META_KEY, backend_class, exists, infer_backend, open_backend
from kdcache.cache.dtypes import STORED_DTYPES
from kdcache.cache.errors import KdcacheError
from kdcache.cache.remote import is_remote, local_path
from kdcache.cache.spec import FORMAT_VERSION, canonical_json

log = logging.getLogger(__name__)

TOKENS = "tokens"
MODES = ("topk", "sampled")
VALUE_DTYPES = ("float16", "bfloat16", "float32")
LAYOUT_ONLY = ("chunk_samples", "compression", "token_chunk")
MAX_TOKEN_CHUNK = 4096


def token_spec(
    teacher: dict, tokenizer_sha256: str, dataset: dict, *, mode: str, k: int,
    max_length: int, dtype: str = "float16", top_p: float | None = None, seed: int = 0,
    chunk_samples: int = 256, compression: str = "none", token_chunk: int = MAX_TOKEN_CHUNK,
) -> dict:  # fmt: skip
    """The spec of a token cache (plain JSON); `token_key` hashes what changes the numbers."""
    if mode not in MODES:
        raise KdcacheError(f"token cache mode {mode!r}; expected one of {MODES}")
    if dtype not in VALUE_DTYPES:
        raise KdcacheError(f"--dtype {dtype!r}; expected one of {VALUE_DTYPES}")
    if not isinstance(k, int) or k < 1:
        raise KdcacheError(f"--{mode} {k!r}; expected an integer >= 1")
    if top_p is not None and not (0 < top_p <= 1):
        raise KdcacheError(f"--top-p {top_p!r}; expected a number in (0, 1]")
    if top_p is not None and mode != "topk":
        raise KdcacheError("--top-p applies to --topk caches only")
    if compression not in ("none", "zstd", "gzip"):
        raise KdcacheError(f"compression {compression!r}; expected none, zstd or gzip")
    spec = {
        "kind": TOKENS,
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer": {"sha256": tokenizer_sha256},
        "dataset": dataset,
        "tokens": {
            "mode": mode, "k": int(k), "max_length": int(max_length), "dtype": dtype,
            "top_p": None if top_p is None else float(top_p),
            "seed": int(seed) if mode == "sampled" else None,
            "vocab_size": int(teacher["vocab_size"]),
        },
        "storage": {"chunk_samples": int(chunk_samples), "compression": compression,
                    "token_chunk": int(token_chunk)},
    }  # fmt: skip
    return check_token_spec(spec, "spec")


def check_token_spec(spec: Any, where: str) -> dict:
    """A token spec's fields have the types the reader relies on; returns it as plain JSON."""
    import json

    if not isinstance(spec, dict) or spec.get("kind") != TOKENS:
        raise KdcacheError(f"{where}: not a token-cache spec (kind {TOKENS!r} expected)")
    tok, st, ds = spec.get("tokens"), spec.get("storage"), spec.get("dataset")
    if not all(isinstance(x, dict) for x in (tok, st, ds, spec.get("teacher"))):
        raise KdcacheError(f"{where}: spec needs objects teacher, dataset, tokens, storage")
    for d, f in ((tok, "k"), (tok, "max_length"), (tok, "vocab_size"), (st, "chunk_samples"),
                 (st, "token_chunk"), (ds, "n"), (ds, "n_tokens")):  # fmt: skip
        v = d.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KdcacheError(f"{where}: spec field {f!r} is {v!r}; expected an integer >= 1")
    if tok.get("mode") not in MODES or tok.get("dtype") not in VALUE_DTYPES:
        raise KdcacheError(
            f"{where}: spec tokens.mode/dtype {tok.get('mode')!r}/{tok.get('dtype')!r}"
        )
    return json.loads(canonical_json(spec))


def token_key(spec: dict) -> str:
    """sha256 of the canonical spec without layout-only fields (chunking, compression)."""
    d = dict(spec)
    d["storage"] = {k: v for k, v in spec["storage"].items() if k not in LAYOUT_ONLY}
    return hashlib.sha256(canonical_json(d).encode("utf-8")).hexdigest()


def pick_token_chunk(lengths: np.ndarray, chunk_samples: int) -> int:
    """Token-axis storage chunk: the largest sample-chunk's tokens rounded up to a power of
    two, within [16, 4096] (small caches do not pad each chunk to 4096 tokens)."""
    n = len(lengths)
    per = [int(lengths[i : i + chunk_samples].sum()) for i in range(0, n, chunk_samples)]
    biggest = max(per) if per else 1
    return int(min(MAX_TOKEN_CHUNK, max(16, 1 << max(0, biggest - 1).bit_length())))


def chunk_bounds(lengths: np.ndarray, chunk_samples: int, token_chunk: int) -> np.ndarray:
    """(n_chunks+1,) int64 token offsets of the sample-chunks, each padded to token_chunk."""
    n = len(lengths)
    per = np.array(
        [int(lengths[i : i + chunk_samples].sum()) for i in range(0, n, chunk_samples)], np.int64
    )
    padded = -(-per // token_chunk) * token_chunk
    return np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)


def sample_starts(lengths: np.ndarray, bounds: np.ndarray, chunk_samples: int) -> np.ndarray:
    """(N,) int64 position of each sample's first token in the flat arrays."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.empty(len(lengths), np.int64)
    for c, lo in enumerate(range(0, len(lengths), chunk_samples)):
        seg = lengths[lo : lo + chunk_samples]
        starts[lo : lo + len(seg)] = bounds[c] + np.concatenate([[0], np.cumsum(seg)[:-1]])
    return starts


# -- vocabulary ids ---------------------------------------------------------------------------
def id_packing(vocab_size: int) -> str:
    """ "u16" (V <= 65536), "u17" (uint16 + 1 bit plane, V <= 131072) or "i32"."""
    if vocab_size <= 1 << 16:
        return "u16"
    return "u17" if vocab_size <= 1 << 17 else "i32"


def pack_ids(ids: np.ndarray, packing: str) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    if packing == "i32":
        return {"ids": ids.astype(np.int32)}
    out = {"ids": (ids & 0xFFFF).astype(np.uint16)}
    if packing == "u17":
        out["ids_hi"] = np.packbits(((ids >> 16) & 1).astype(np.uint8), axis=-1)
    return out


def unpack_ids(arrays: dict[str, np.ndarray], packing: str, k: int) -> np.ndarray:
    ids = np.asarray(arrays["ids"]).astype(np.int64)
    if packing == "u17":
        hi = np.unpackbits(np.asarray(arrays["ids_hi"]), axis=-1, count=k).astype(np.int64)
        ids |= hi << 16
    return ids


def token_arrays(spec: dict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-token arrays: name -> (trailing shape, numpy dtype)."""
    t = spec["tokens"]
    k, v = t["k"], t["vocab_size"]
    packing = id_packing(v)
    out: dict[str, tuple[tuple[int, ...], Any]] = {
        "input_ids": ((), np.uint16 if v <= 1 << 16 else np.int32),
        "loss_mask": ((), np.uint8),
        "ids": ((k,), np.int32 if packing == "i32" else np.uint16),
    }
    if packing == "u17":
        out["ids_hi"] = ((-(-k // 8),), np.uint8)
    if t["mode"] == "topk":
        out["logprobs"] = ((k,), STORED_DTYPES[t["dtype"]])
        out["tail"] = ((), STORED_DTYPES[t["dtype"]])
    else:
        out["counts"] = ((k,), np.uint8 if k < 256 else np.uint16)
    return out


def bytes_per_token(spec: dict) -> int:
    """Stored bytes per token (before compression and chunk padding)."""
    return int(
        sum(np.dtype(dt).itemsize * int(np.prod(s)) for s, dt in token_arrays(spec).values())
    )


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
    from kdcache.cache.tokens import TokenWriter

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
