"""A cache's attrs: what a fresh cache records (spec, key, counts, provenance) and raw reads
of the attrs of a cache or a multi-teacher store."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from kdcache.cache.backends import open_backend
from kdcache.cache.schema import check_meta
from kdcache.cache.spec import FORMAT_VERSION, CacheSpec


def make_provenance(extra: dict | None = None) -> dict:
    """Versions and time of creation; stored in attrs, never hashed into the key."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str, default: str = "unknown") -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return default

    out = {
        "kdcache": ver("kdcache", "0.1.0"),
        "numpy": np.__version__,
        "zarr": ver("zarr"),
        "h5py": ver("h5py"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {**out, **(extra or {})}


def read_meta(path: str, storage_options: dict | None = None) -> dict:
    """The kdcache attrs at `path` (a cache or a multi-teacher store), schema-checked."""
    b = open_backend(path, False, storage_options)
    try:
        return check_meta(b.get_meta(), path)
    finally:
        b.close()


def new_meta(spec: CacheSpec, provenance: dict | None) -> dict:
    """The attrs of a freshly laid-out cache (not complete, no checksums yet)."""
    return {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "key": spec.key(),
        "counts": {
            "n": spec.n,
            "num_augs": spec.num_augs,
            "num_classes": spec.num_classes,
            "n_chunks": spec.n_chunks,
        },
        "provenance": make_provenance(provenance),
        "complete": False,
        "checksums": None,
    }
