"""glibc malloc settings for the long loops of both stages (a no-op elsewhere).

Why: glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB on 64-bit),
after which every batch-sized buffer (view batches received from the workers, activations,
gradients, logits) is carved from the heap, interleaved with small long-lived objects, so
freed pages stay resident. The main process's RSS then crept up with the steps of a run (and
with machine load, which changes the interleaving) while the workers stayed flat: that was the
"+kB per image" of issue 17, not Python objects (tracemalloc: flat during the loop). A fixed
threshold keeps each buffer above it in its own mapping, returned to the OS when freed, and
`trim()` hands freed heap pages back after set-up and at chunk/epoch boundaries.
`MALLOC_MMAP_THRESHOLD_` in the environment (glibc's own knob) wins over ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 256 * 1024
"""Bytes; glibc's initial default is 128 kB (the dynamic one grows to 32 MB). A batch of 64
32x32 RGB uint8 views is 196 kB, so every batch-sized buffer is mapped on its own."""


@functools.lru_cache(maxsize=1)
def _libc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    return libc


@functools.lru_cache(maxsize=1)
def tune_malloc() -> bool:
    """Fix the mmap threshold at `MMAP_THRESHOLD` for this process (and the DataLoader
    workers it forks later); True when applied. Once per process."""
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    log.debug("malloc: mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD, ok)
    return ok


def trim() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim(0)); cheap at chunk/epoch ends."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
