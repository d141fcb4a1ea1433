"""Memory flat per image (issue 17): glibc's mmap threshold is fixed by both stages' runtime,
so a batch-sized buffer freed after a bigger one is still mapped on its own (returned to the
OS when freed) instead of carved from the heap, where its pages stayed resident."""

from __future__ import annotations

import ctypes
import os

import pytest
from kdcache.models import malloc


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )  # fmt: skip
    ]


def _libc():
    libc = malloc._libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _mapped_after_big_free(libc, big: int, small: int) -> int:
    """Bytes in mmapped blocks gained by a `small` block allocated after a `big` one was
    freed (glibc's dynamic threshold would have risen to `big`, putting `small` on the heap)."""
    p = libc.malloc(big)
    libc.free(p)
    before = libc.mallinfo2().hblkhd
    q = libc.malloc(small)
    gained = libc.mallinfo2().hblkhd - before
    libc.free(q)
    return gained


def test_runtime_fixes_the_mmap_threshold():
    from kdcache.models.runtime import init_runtime

    libc = _libc()
    init_runtime("cpu")  # what precompute and distill call first
    small = 4 * malloc.MMAP_THRESHOLD  # e.g. a 1 MB view batch or activation
    assert _mapped_after_big_free(libc, 64 << 20, small) >= small
    # below the threshold small blocks stay on the heap (no mmap per tiny tensor)
    assert _mapped_after_big_free(libc, 64 << 20, malloc.MMAP_THRESHOLD // 4) == 0
    assert malloc.tune_malloc() or "MALLOC_MMAP_THRESHOLD_" in os.environ  # applied once
    malloc.trim()  # callable at any time, returns nothing


def test_bench_sampler_sees_main_and_worker_rss():
    """bench/rss.py (used by `bench/data.py --only rss`) samples the main process and each
    child through the run, not only the final peak."""
    import sys

    from bench.rss import growth_rows, sample_run

    code = (
        "import os, time\n"
        "a = bytearray(80 << 20)\n"  # the main process holds 80 MB
        "if os.fork() == 0:\n"
        "    b = bytearray(40 << 20); time.sleep(1.5); os._exit(0)\n"
        "os.wait()\n"
    )
    r = sample_run([sys.executable, "-c", code], every=0.1)
    assert r["peak"] >= 80 and r["steady"] >= 80 and r["samples"] >= 5
    assert r["worker"] >= 40  # the forked child's own pages (a copy-on-write 80 MB + 40 MB)
    rows = growth_rows(1000, {**r, "peak": 100.0}, 2000, {**r, "peak": 101.0})
    assert r["steady"] <= r["busy_max"] <= r["peak"] + 1
    assert rows[3] == ("main peak (VmHWM)", 100.0, 101.0, 1.024)  # 1 MB over 1000 images
