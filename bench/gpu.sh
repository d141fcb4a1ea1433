#!/usr/bin/env bash
# One-shot GPU benchmark of both stages (bench/gpu.py): prints one table, < 8 minutes.
# Without a CUDA GPU it says so and exits 0. Extra arguments go to bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# GPU_BENCH_ANY_DEVICE=1 runs it anyway (tests/test_bench.py: `--device cpu --tiny`)
if [ -z "${GPU_BENCH_ANY_DEVICE:-}" ] &&
    ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch ($PY); nothing to benchmark here."
    echo "Run it on a machine with a GPU (bench/distill.py and bench/precompute.py run on CPU)."
    exit 0
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec timeout 470 "$PY" bench/gpu.py "$@"
