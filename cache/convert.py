"""`cache convert`: zarr <-> HDF5 (the same stored bytes and checksums), a different storage
dtype or compression, or dense -> sparse (top-k / sampled, see sparse.py).

Dense -> sparse conversions record, in the new cache's attrs, the mean KL divergence between
the dense and the rebuilt sparse targets at T=1 and T=4 (`cache info` shows it).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from kdcache.cache.backends import infer_backend
from kdcache.cache.errors import KdcacheError
from kdcache.cache.reader import MULTI
from kdcache.cache.share import (
    Destination,
    _check_same_dst,
    chunk_bytes,
    for_backend,
    open_target,
    progress_bar,
)
from kdcache.cache.sparse import describe, kl_sum
from kdcache.cache.spec import CacheSpec
from kdcache.cache.store import open_cache, read_meta
from kdcache.cache.tokens import open_token_cache

log = logging.getLogger(__name__)
KL_TEMPERATURES = (1.0, 4.0)


def target_spec(spec: CacheSpec, dtype=None, topk=None, sampled=None, compression=None):
    """SRC's spec with the storage options changed."""
    if topk is not None and sampled is not None:
        raise KdcacheError(f"--topk {topk} and --sampled {sampled} exclude each other; give one")
    storage = dict(spec.storage)
    if dtype is not None:
        storage["dtype"] = dtype
    if compression is not None:
        storage["compression"] = compression
    if topk is not None:
        storage.update(topk=topk, sampled=None)
    if sampled is not None:
        storage.update(topk=None, sampled=sampled)
    return CacheSpec.from_dict({**spec.to_dict(), "storage": storage})


def convert(
    src: str, dst: str, *, dtype: str | None = None, topk: int | None = None,
    sampled: int | None = None, compression: str | None = None,
    storage_options: dict | None = None, break_lock: bool = False, overwrite: bool = False,
    progress: bool = False, command: str | None = None,
) -> dict:  # fmt: skip
    """Write SRC to DST in another format/storage; returns a summary with the KL report."""
    if read_meta(src, storage_options).get("kind") == "tokens":
        if dtype is not None or topk is not None or sampled is not None:
            raise KdcacheError(
                f"{src} is a token cache: convert changes its backend (zarr <-> HDF5) and "
                "--compression only; rerun precompute for another --dtype/--topk/--sampled"
            )
        from kdcache.cache.tokencopy import copy_token_cache

        r = copy_token_cache(src, dst, storage_options=storage_options, break_lock=break_lock,
                             overwrite=overwrite, compression=compression)  # fmt: skip
        with open_token_cache(dst, storage_options) as c:
            from kdcache.cache.tokenstore import bytes_per_token

            bpt = bytes_per_token(c.spec)
            r.update(storage=f"{c.mode}{c.k}", dtype=c.dtype, entry_bytes=bpt,
                     src_entry_bytes=bpt)  # fmt: skip
        return r
    if read_meta(src, storage_options).get("kind") == MULTI:
        raise KdcacheError(
            f"{src} is a multi-teacher store; convert its members one at a time ({src}/t0, ...)"
        )
    with open_cache(src, storage_options=storage_options) as s:
        s.require_complete()
        new = target_spec(s.spec, dtype, topk, sampled, compression)
        if compression is None:
            new = for_backend(new, infer_backend(dst))
        same = new.key() == s.key
        if s.storage_kind != "dense" and not same:
            raise KdcacheError(
                f"{src} is a {describe(s.spec.storage)} cache; convert makes sparse caches from "
                "dense ones only (format and compression of any cache can change)"
            )
        kl = dict.fromkeys(KL_TEMPERATURES, 0.0)
        entries = 0
        with Destination(dst, storage_options, break_lock, command, overwrite) as d:
            if d.exists:
                _check_same_dst(d, [_Spec(new)], [None], {})
            w = open_target(
                d.work, new, s, backend=d.backend, so=d.so, discard_other=d.work != d.dst
            )
            try:
                have = np.asarray(w._b.read("done")).astype(bool)
                total = sum(chunk_bytes(s, c) for c in range(s.n_chunks))
                with progress_bar(total, f"convert {os.path.basename(d.dst)}", progress) as bar:
                    for c in range(s.n_chunks):
                        arrays, vp = s.read_chunk_verified(c)
                        if same:
                            if not have[c]:
                                w.write_chunk_stored(c, arrays, vp, s.checksum(c))
                        else:
                            dense = s.codec.decode(arrays)
                            out = (
                                w.read_chunk_stored(c, True)
                                if have[c]
                                else w.write_chunk(c, dense, vp)
                            )
                            if w.storage_kind != "dense":
                                rebuilt = w.codec.decode(out)
                                for t in KL_TEMPERATURES:
                                    kl[t] += kl_sum(dense, rebuilt, t)
                                entries += dense.shape[0] * dense.shape[1]
                        bar.update(chunk_bytes(s, c))
                extra = {"converted_from": {"path": src, "key": s.key,
                                            "storage": describe(s.spec.storage)}}  # fmt: skip
                if entries:
                    extra["sparse_kl"] = {
                        "dense_key": s.key,
                        "entries": entries,
                        **{f"T{t:g}": kl[t] / entries for t in KL_TEMPERATURES},
                    }
                if not w.is_complete():
                    w.finalize(extra)
            finally:
                w.close()
            d.publish()
        result = {
            "src": src, "dst": dst, "storage": describe(new.storage), "dtype": new.dtype,
            "entry_bytes": _entry_bytes(new), "src_entry_bytes": s.entry_bytes(),
            "same_bytes": same, **({"sparse_kl": extra["sparse_kl"]} if entries else {}),
        }  # fmt: skip
    log.info("converted %s -> %s (%s)", src, dst, result["storage"])
    return result


class _Spec:
    """The bit of a Cache that _check_same_dst needs, for a spec not yet written."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec


def _entry_bytes(spec: CacheSpec) -> int:
    from kdcache.cache.sparse import get_codec

    return get_codec(spec).entry_bytes()
