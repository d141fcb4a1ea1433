"""`cache merge`: (a) shards of one spec (disjoint done chunks, from several people or ranks)
into one complete cache; (b) caches of several teachers on the same dataset and views into
one multi-teacher store that `distill --cache` ensembles. Inputs are grouped by cache key:
one group gives a plain cache, several give a store with one member per teacher.

A multi-teacher store is a zarr group (HDF5 file) whose attrs say kind "multi-teacher" and
list its members; each member (`<store>/t0`, `<store>/t1`, ...) is a complete cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
from kdcache.cache.backends import backend_class, infer_backend
from kdcache.cache.errors import KdcacheError
from kdcache.cache.reader import MULTI, Cache, _first
from kdcache.cache.share import Destination, chunk_bytes, for_backend, open_target, progress_bar
from kdcache.cache.spec import FORMAT_VERSION, describe_diff
from kdcache.cache.store import make_provenance, open_members, read_meta

log = logging.getLogger(__name__)
SHARED = ("dataset", "views", "format_version")  # what teachers of one store must share


def _group(caches: list[Cache]) -> list[list[Cache]]:
    """Caches grouped by key, in order of first appearance."""
    groups: dict[str, list[Cache]] = {}
    for c in caches:
        groups.setdefault(c.key, []).append(c)
    return list(groups.values())


def _owners(group: list[Cache]) -> dict[int, Cache]:
    """Which shard provides each chunk; refuses gaps, differing layouts, and a chunk done in
    two shards with different checksums (the same chunk twice is the same bytes: one is kept)."""
    base = group[0]
    owner: dict[int, Cache] = {}
    for sh in group:
        names = [d for d in sh.spec.diff(base.spec) if d != "storage.compression"]
        if names:
            raise KdcacheError(
                f"shard {sh.path} has a different spec than {base.path}: "
                f"{describe_diff(sh.spec, base.spec)}"
            )
        for c in np.flatnonzero(sh.done()):
            first = owner.get(int(c))
            if first is None:
                owner[int(c)] = sh
            elif first.checksum(int(c)) != sh.checksum(int(c)):
                raise KdcacheError(
                    f"chunk {c} is done in both {first.path} and {sh.path} with different "
                    "checksums (not the same teacher outputs); expected disjoint or equal chunks"
                )
    missing = [c for c in range(base.n_chunks) if c not in owner]
    if missing:
        raise KdcacheError(
            f"no shard has chunks {_first(missing)} of {base.n_chunks} "
            f"(teacher {base.spec.teacher.get('name', '?')!r})"
        )
    return owner


def _check_shared(groups: list[list[Cache]]) -> None:
    """Teachers of one store must share the dataset and the views, named field by field."""
    a = groups[0][0]
    for g in groups[1:]:
        b = g[0]
        names = [d for d in b.spec.diff(a.spec) if d.split(".")[0] in SHARED]
        if names:
            parts = [
                f"{n}: {_get(b, n)!r} in {b.path} vs {_get(a, n)!r} in {a.path}" for n in names[:3]
            ]
            raise KdcacheError(
                f"cannot merge: {'; '.join(parts)} (teachers can be merged only on the same "
                "dataset and views)"
            )


def _get(cache: Cache, dotted: str):
    cur = cache.spec.to_dict()
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def merge(
    out: str, inputs: Sequence[str], *, mode: str = "auto", storage_options: dict | None = None,
    overwrite: bool = False, backend: str | None = None, break_lock: bool = False,
    progress: bool = False, command: str | None = None,
) -> dict:  # fmt: skip
    """Merge caches (see the module doc); returns a summary. mode: auto | shards."""
    if not inputs:
        raise KdcacheError("merge needs at least one input cache")
    if read_meta(inputs[0], storage_options).get("kind") == "tokens":
        from kdcache.cache.tokencopy import merge_token_shards

        return merge_token_shards(out, inputs, storage_options=storage_options,
                                  overwrite=overwrite, break_lock=break_lock)  # fmt: skip
    if backend is not None and infer_backend(out, backend) != infer_backend(out):
        raise KdcacheError(f"merge output {out} does not end in the suffix of backend {backend}")
    caches: list[Cache] = []
    try:
        for p in inputs:
            if str(p).rstrip("/") == str(out).rstrip("/"):
                raise KdcacheError(f"merge output {out} is also an input")
            caches += open_members(p, storage_options)
        groups = _group(caches)
        if len(groups) > 1 and mode == "shards":
            a, b = groups[0][0], groups[1][0]
            diff = describe_diff(b.spec, a.spec)
            raise KdcacheError(f"shard {b.path} has a different spec than {a.path}: {diff}")
        _check_shared(groups)
        owners = [_owners(g) for g in groups]
        multi = len(groups) > 1
        with Destination(out, storage_options, break_lock, command, overwrite) as d:
            if d.exists:
                raise KdcacheError(f"merge output {out} exists; pass overwrite (--overwrite)")
            names = [f"t{i}" for i in range(len(groups))] if multi else [None]
            total = sum(chunk_bytes(g[0], c) for g in groups for c in range(g[0].n_chunks))
            with progress_bar(total, "merge", progress) as bar:
                for name, g, owner in zip(names, groups, owners, strict=True):
                    prov = make_provenance({"merged_from": [c.path for c in g]})
                    spec = for_backend(g[0].spec, d.backend)
                    w = open_target(
                        d.path(name), spec, g[0], backend=d.backend, so=d.so,
                        provenance=prov, discard_other=True,
                    )  # fmt: skip
                    try:
                        done = np.asarray(w._b.read("done")).astype(bool)
                        for c, sh in sorted(owner.items()):
                            if not done[c]:
                                arrays, vp = sh.read_chunk_verified(c)
                                w.write_chunk_stored(c, arrays, vp, sh.checksum(c))
                            bar.update(chunk_bytes(sh, c))
                        w.finalize()
                    finally:
                        w.close()
            if multi:
                backend_class(d.backend).create_root(d.work, _root_meta(groups, names), d.so)
            d.publish()
    finally:
        for c in caches:
            c.close()
    kind = MULTI if multi else "cache"
    log.info("merged %d inputs into %s (%s)", len(inputs), out, kind)
    return {"out": out, "kind": kind, "teachers": [g[0].spec.teacher.get("name") for g in groups],
            "members": [n for n in names if n], "inputs": [str(p) for p in inputs]}  # fmt: skip


def _root_meta(groups: list[list[Cache]], names: list) -> dict:
    first = groups[0][0].spec
    return {
        "format_version": FORMAT_VERSION,
        "kind": MULTI,
        "members": names,
        "teachers": [g[0].spec.teacher for g in groups],
        "keys": [g[0].key for g in groups],
        "dataset": first.dataset,
        "views": first.views,
        "provenance": make_provenance({"merged_from": [c.path for g in groups for c in g]}),
        "complete": True,
        "finalized_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def merge_shards(
    out_path: str, shard_paths: Sequence[str], *, overwrite: bool = False,
    backend: str | None = None, break_lock: bool = False, storage_options: dict | None = None,
) -> str:  # fmt: skip
    """Join caches of the same spec whose done chunks are disjoint and cover all chunks."""
    if not shard_paths:
        raise KdcacheError("merge_shards needs at least one shard")
    merge(
        out_path, shard_paths, mode="shards", overwrite=overwrite, backend=backend,
        break_lock=break_lock, storage_options=storage_options,
    )  # fmt: skip
    return out_path
