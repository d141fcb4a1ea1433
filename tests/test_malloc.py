"""Memory flat per image (issue 17): the heap pages that batch-sized buffers free are handed
back to the OS (malloc_trim) during both stages' loops, instead of staying resident."""

from __future__ import annotations

import ctypes

import pytest
from kdcache.models import malloc


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:"))


def test_trim_returns_freed_heap_pages():
    libc = malloc._libc()
    if libc is None:
        pytest.skip("needs glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    blocks = [libc.malloc(64 << 10) for _ in range(3200)]  # heap blocks (< mmap threshold)
    for blk in blocks:
        libc.memset(blk, 1, 64 << 10)  # resident
    for blk in blocks[::2]:  # 100 MB freed in holes between live blocks: they cannot
        libc.free(blk)  # coalesce into the heap top (fragmentation, as in a run)
    before = _rss_mb()
    malloc.trim()
    after = _rss_mb()
    for blk in blocks[1::2]:
        libc.free(blk)
    assert before - after > 50, (before, after)  # the freed 100 MB left the RSS


def test_trimming_trims_at_most_every_n_seconds(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "trim", lambda: calls.append(1))
    assert list(malloc.trimming(range(5), every=0.0)) == [0, 1, 2, 3, 4]
    assert len(calls) == 5
    calls.clear()
    malloc._last[0] = __import__("time").monotonic()
    assert list(malloc.trimming(range(5), every=3600.0)) == [0, 1, 2, 3, 4]
    assert calls == []


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


def test_hold_heap_keeps_big_buffers_until_trim():
    """CPU distill (`hold_heap`): a 64 MB buffer comes from the heap and stays resident when
    freed (the next step reuses its pages instead of faulting fresh ones in), until trim();
    after `release_heap()` (end of the run) freed big buffers leave at once again."""
    import subprocess
    import sys

    code = """
import ctypes
from kdcache.models import malloc
from tests.test_malloc import _rss_mb
libc = malloc._libc()
if libc is None or not malloc.hold_heap():
    print("skip"); raise SystemExit
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
blk = libc.malloc(64 << 20)
libc.memset(blk, 1, 64 << 20)
a = _rss_mb(); libc.free(blk); b = _rss_mb(); malloc.trim(); c = _rss_mb()
malloc.release_heap()  # the run is over: a freed 64 MB buffer goes back at once again
blk = libc.malloc(64 << 20)
libc.memset(blk, 1, 64 << 20)
d = _rss_mb(); libc.free(blk); e = _rss_mb()
print(a - b, b - c, d - e)
"""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True).stdout.split()  # fmt: skip
    if out == ["skip"]:
        pytest.skip("needs glibc")
    kept, trimmed, released = (float(v) for v in out)
    assert kept < 8 and trimmed > 50 and released > 50, (kept, trimmed, released)
