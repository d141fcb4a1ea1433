"""Leftovers of killed runs, removed by the next run of the same command.

A kill can leave: the temporary cache a creation was laying out (`<cache>.tmp-<pid>-<hex>`),
zarr's own temporary objects inside a store (`<object>.<32 hex>.partial`, written then renamed
by zarr's LocalStore), the temporary file of a lock being created (`<cache>.lock.<hex>.tmp`)
and a checkpoint being saved (`last.pt.tmp-<pid>`). They are only removed by a writer that
holds the cache's lock (or owns the run directory), and a `<pid>` one only when that pid is
no longer running on this host, so a live writer's temporaries are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time

from kdcache.cache import remote
from kdcache.cache.lock import pid_alive

log = logging.getLogger(__name__)

_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
_PID_TMP = re.compile(r"\.tmp-(\d+)(?:-[0-9a-f]+)?$")
LOCK_TMP_AGE_S = 60.0  # a lock file's temporary lives for microseconds


def _remove(path: str) -> None:
    log.warning("removing the leftover %s of a killed run", path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def dead_pid_temps(path: str) -> list[str]:
    """Remove `<path>.tmp-<pid>[-<hex>]` siblings whose pid no longer runs; returns them."""
    path = remote.local_path(str(path)).rstrip("/")
    if remote.is_remote(path):
        return []
    folder, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:  # missing, or an HDF5 file (`x.h5/t0` members)
        return []
    for name in names:
        if not name.startswith(base + ".tmp-"):
            continue
        m = _PID_TMP.search(name[len(base) :])
        if m and m.start() == 0 and not pid_alive(int(m.group(1))):
            _remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


def zarr_partials(path: str) -> list[str]:
    """Remove zarr's temporary `*.<hex>.partial` objects inside a local store we hold."""
    path = remote.local_path(str(path)).rstrip("/")
    if remote.is_remote(path) or not os.path.isdir(path):
        return []
    removed = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            if _ZARR_PARTIAL.search(f):
                _remove(os.path.join(root, f))
                removed.append(os.path.join(root, f))
    return removed


def lock_temps(lock_file: str) -> list[str]:
    """Remove `<lock>.<hex>.tmp` files older than a minute (a lock create was killed)."""
    if remote.is_remote(lock_file):
        return []
    folder, base = os.path.split(lock_file)
    removed = []
    now = time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if name.startswith(base + ".") and name.endswith(".tmp"):
            full = os.path.join(folder, name)
            try:
                old = now - os.path.getmtime(full) > LOCK_TMP_AGE_S
            except FileNotFoundError:
                continue
            if old:
                _remove(full)
                removed.append(full)
    return removed


def clean_cache(path: str) -> None:
    """Everything a killed writer of the cache at `path` can leave (caller holds the lock)."""
    dead_pid_temps(path)
    zarr_partials(path)
