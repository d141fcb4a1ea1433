"""The one-shot GPU benchmark must work the first time a GPU is lent (device time is scarce):
its script runs here on CPU with tiny models through the same code paths (JPEG loader +
rrc-flip, in-RAM crop-flip, precompute vs bare forward, every distill mode and the peers).
bench/api.py, whose figures the README quotes, runs on tiny data too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def test_gpu_bench_tiny_prints_a_full_table_on_cpu():
    args = ["bash", "bench/gpu.sh", "--device", "cpu", "--tiny", "--workers", "1"]
    p = _run(args, PYTHON=sys.executable, GPU_BENCH_ANY_DEVICE="1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "precompute:" not in p.stderr  # no progress bars to push the table out of a tail
    lines = p.stdout.splitlines()
    head = next(ln for ln in lines if ln.startswith("scenario"))
    cols = head.split()
    assert cols[1:8] == ["CE", "cached", "online", "plain", "timm-on", "bare", "cach/CE"]
    scenarios = ("imagenet-like", "cifar-like")
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith(scenarios)}
    assert set(rows) == {"imagenet-like", "cifar-like"}
    for name, row in rows.items():
        assert len(row) == len(cols), (name, row)
        values = dict(zip(cols, row, strict=True))
        for c in ("CE", "cached", "online", "plain", "timm-on", "bare"):
            assert float(values[c]) > 0, (name, c, values[c])
        for c in ("cach/CE", "CE/bare", "CE/pl", "cach/on", "ideal", "pre/bare"):
            assert 0.0 < float(values[c]) < 100.0, (name, c, values[c])
        assert values["util-pre"] == "n/a"  # no nvidia-smi here
    assert any(ln.startswith("total ") for ln in lines)
    assert "goals:" in p.stdout


def test_gpu_sh_without_a_gpu_says_so_and_exits_0():
    p = _run(["bash", "bench/gpu.sh"], PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 0, p.stderr
    assert "no CUDA GPU visible" in p.stdout
    assert "scenario" not in p.stdout  # nothing was benchmarked


def test_api_bench_prints_a_row_per_source():
    """bench/api.py (README figures for CachedDataset vs distill's loader) on tiny data."""
    args = [sys.executable, "bench/api.py", "--n", "96", "--epochs", "2", "--rounds", "1",
            "--workers", "1", "--batch-size", "32", "--sources", "in-ram-32px", "text"]  # fmt: skip
    p = _run(args)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {ln.split()[0]: ln.split()[1:] for ln in p.stdout.splitlines() if ln.strip()}
    assert set(rows) == {"source", "in-ram-32px", "text"}
    for name in ("in-ram-32px", "text"):
        assert len(rows[name]) == 5 and all(float(v) > 0 for v in rows[name]), rows[name]
