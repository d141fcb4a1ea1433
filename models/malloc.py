"""glibc heap trimming for the long loops of both stages (a no-op without glibc).

Why: glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB on 64-bit),
after which batch-sized buffers (view batches received from the workers, activations,
gradients, logits) are carved from the heap among small long-lived objects, and the pages
they free stay resident. The main process's RSS then crept up with the steps of a run (by how
much depending on machine load) while the workers stayed flat: the "+kB per image" of issue
17, not Python objects (tracemalloc stays flat through the loop). `malloc_trim(0)` hands the
free pages back; it runs after set-up, at epoch ends and at most every `TRIM_EVERY_S` seconds
inside the loops, so its cost (the next step faults those pages in again) stays small.
A fixed mmap threshold (mallopt, or `MALLOC_MMAP_THRESHOLD_=262144`) keeps RSS flatter still
but made CPU training 1.3-2x slower (every activation mapped and faulted in anew each step),
so it is an opt-in through the environment, not the default (README, bench/data.py).

CPU training (`hold_heap`): buffers over glibc's 32 MB mmap cap (oneDNN's convolution
scratch: resnet18, batch 64, 32x32 maps and unmaps 3x72 MB + 36 MB per step) are always
mapped, and the heap top is trimmed back by `free` (~38 MB a step), so every step faulted
~22k fresh pages in again (~70-90 ms of kernel time of a ~450 ms step on 2 cores). With
mapping off and automatic trimming off those pages stay in the heap and are reused; RSS is
still handed back by the explicit `trim()` calls above (set-up, epoch ends, every 20 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
TRIM_EVERY_S = 20.0
_last = [0.0]
_held = [False]  # hold_heap() is on (release_heap() undoes it)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


@functools.lru_cache(maxsize=1)
def _libc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> None:
    """Return the heap's free pages to the OS now (glibc malloc_trim(0))."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    _last[0] = time.monotonic()


def hold_heap() -> bool:
    """Serve every allocation from the heap and trim it only through `trim()` (mallopt
    M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB): a CPU training step then reuses its big scratch
    buffers' pages instead of mapping and faulting them in anew. Process-wide until
    `release_heap()` (distill's `run` calls it at the end); False without glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    _held[0] = True
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_heap() -> None:
    """Undo `hold_heap()` when a run ends (a notebook's process goes on): glibc's default
    limits back (65536 mmaps, trim above 128 KiB; its dynamic mmap threshold stays off) and
    the held pages returned now."""
    if not _held[0]:
        return
    _held[0] = False
    libc = _libc()
    libc.mallopt(_M_MMAP_MAX, 65536)
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    trim()


def maybe_trim(every: float = TRIM_EVERY_S) -> bool:
    """`trim()` when the last one is more than `every` seconds ago; True when it trimmed."""
    if time.monotonic() - _last[0] < every:
        return False
    trim()
    return True


def trimming(it: Iterable[T], every: float = TRIM_EVERY_S) -> Iterator[T]:
    """The items of `it`, with `maybe_trim(every)` before each one (a run's batches)."""
    for x in it:
        maybe_trim(every)
        yield x
