"""Per-process RSS sampled through a run: the main process and each DataLoader worker, read
from /proc every `every` seconds (Linux), so growth during the run shows, not only the final
peak. Used by `bench/data.py --only rss`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time


def _status(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of `pid` in MB, None when it is gone."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        return None, None
    return rss, hwm


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def sample_run(cmd: list[str], every: float = 0.5, cwd=None, env=None) -> dict:
    """Run `cmd`, sampling its RSS and its children's; returns the series and a summary:
    main `start` (first sample once workers run), `steady` (median of the second half of the
    samples with workers), `busy_max` (largest sample while workers run), `peak` (VmHWM, the
    whole process life, exit included); workers: the largest RSS any worker reached."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    series: list[tuple[float, float, list[float]]] = []
    hwm = 0.0
    while p.poll() is None:
        rss, h = _status(p.pid)
        kids = [r for r in (_status(k)[0] for k in _children(p.pid)) if r]
        if rss:
            series.append((time.perf_counter() - t0, rss, kids))
            hwm = max(hwm, h or 0.0)
        time.sleep(every)
    _out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} failed:\n{err.decode()[-2000:]}")
    busy = [s for s in series if s[2]] or series
    half = busy[len(busy) // 2 :]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "start": round(busy[0][1], 1),
        "steady": round(statistics.median(s[1] for s in half), 1),
        "busy_max": round(max(s[1] for s in busy), 1),
        "peak": round(hwm, 1),
        "worker": round(max((max(s[2]) for s in busy if s[2]), default=0.0), 1),
        "samples": len(series),
    }


def growth_rows(n0: int, r0: dict, n1: int, r1: dict) -> list[tuple[str, float, float, float]]:
    """(measure, MB at n0, MB at n1, kB per image) for main start/steady/peak and workers."""
    rows = []
    for k, name in (("start", "main at loop start"), ("steady", "main steady (median, 2nd half)"),
                    ("busy_max", "main max while workers run"), ("peak", "main peak (VmHWM)"),
                    ("worker", "largest worker")):  # fmt: skip
        rows.append((name, r0[k], r1[k], (r1[k] - r0[k]) * 1024 / (n1 - n0)))
    return rows
