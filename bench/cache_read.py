"""Read throughput of the cache in samples per CPU-second (time.process_time, all threads).

Batches of 128 (sample, aug) pairs, for zarr and HDF5, in RAM mode (Cache.load, then
iter_epoch over InMemoryLogits), chunk-aware mode (iter_epoch over the Cache) and, for
contrast, naive random row reads (Cache.read on random pairs). Then sparse caches at C=1000
(bytes per entry vs dense float16, read rates, KL of the rebuilt targets) and chunk-aware
reads from S3 (a moto server on 127.0.0.1 in its own process). Not a test.

    .venv/bin/python bench/cache_read.py [--quick] [--only dense|sparse|s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdcache.cache.reader import iter_epoch  # noqa: E402
from kdcache.cache.spec import CacheSpec  # noqa: E402
from kdcache.cache.store import create_cache, open_cache  # noqa: E402

BATCH = 128
GOALS = {100: 100_000, 1000: 30_000}  # samples per CPU-second for the default (RAM) mode


def build(
    path: str, n: int, a: int, c: int, chunk: int, scale: float = 1.0, peak: float = 0.0
) -> None:
    """Write a cache of random float16 logits (scale * N(0,1), + peak on one class/sample)."""
    spec = CacheSpec(
        teacher={"name": "bench", "num_classes": c},
        dataset={"name": "bench", "n": n},
        views={"policy": "none", "num_augs": a, "param_dim": 4},
        storage={"chunk_samples": chunk},
    )
    rng = np.random.default_rng(0)
    w = create_cache(path, spec, labels=np.zeros(n, np.int64), keys=[str(i) for i in range(n)])
    for k in w.todo_chunks():
        s, e = w.chunk_range(k)
        logits = rng.standard_normal((e - s, a, c), dtype=np.float32) * scale
        logits[np.arange(e - s), :, rng.integers(0, c, e - s)] += peak
        w.write_chunk(k, logits, np.zeros((e - s, a, 4), np.float32))
    w.finalize()
    w.close()


def epoch_rate(source, seed: int = 0) -> tuple[float, int]:
    """(samples per CPU-second, samples) for one epoch of iter_epoch."""
    t = time.process_time()
    count = 0
    for s, _a, logits in iter_epoch(source, BATCH, seed=seed, epoch=0):
        count += len(s)
        assert logits.dtype == np.float32
    return count / max(time.process_time() - t, 1e-9), count


def random_rate(cache, n_batches: int) -> float:
    rng = np.random.default_rng(1)
    t = time.process_time()
    for _ in range(n_batches):
        cache.read(rng.integers(0, cache.n, BATCH), rng.integers(0, cache.num_augs, BATCH))
    return n_batches * BATCH / max(time.process_time() - t, 1e-9)


def measure(path: str, quick: bool) -> dict:
    with open_cache(path) as cache:
        t = time.process_time()
        mem = cache.load()
        cold = time.process_time() - t  # includes first-touch page faults of fresh RAM
        del mem
        t = time.process_time()
        mem = cache.load()
        load = time.process_time() - t
        ram, count = epoch_rate(mem)
        return {
            "ram": ram,
            "ram_load": count / (count / ram + load),  # one epoch paying the whole load
            "chunked": epoch_rate(cache)[0],
            "random": random_rate(cache, 5 if quick else 20),
            "cold": cold,
            "load": load,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shrink N 10x for a smoke run")
    ap.add_argument("--chunk-samples", type=int, default=1024)
    ap.add_argument("--only", choices=["dense", "sparse", "s3"], default=None)
    args = ap.parse_args()
    from bench.cache_remote import remote_table, sparse_table

    if args.only in (None, "dense"):
        dense_table(args)
    if args.only in (None, "sparse"):
        sparse_table(args)
    if args.only in (None, "s3"):
        remote_table(args)


def dense_table(args) -> None:
    configs = [(100, 50_000, 8), (1000, 20_000, 8)]
    if args.quick:
        configs = [(c, n // 10, a) for c, n, a in configs]
    head = (
        f"{'C':>5} {'N':>6} {'A':>2} {'backend':<7} {'RAM':>10} {'RAM+load':>10} "
        f"{'chunked':>10} {'random':>8} {'load s':>11} {'MiB':>5}  goal (RAM)"
    )
    print(f"samples per CPU-second, batches of {BATCH} (sample, aug) pairs, float16 storage")
    print(head)
    print("-" * len(head))
    tmp = tempfile.mkdtemp(prefix="kdcache-bench-")
    try:
        for c, n, a in configs:
            for backend, suffix in (("zarr", ".zarr"), ("hdf5", ".h5")):
                path = os.path.join(tmp, f"c{c}{suffix}")
                build(path, n, a, c, args.chunk_samples)
                r = measure(path, args.quick)
                size = sum(
                    os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                ) if os.path.isdir(path) else os.path.getsize(path)  # fmt: skip
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                goal = GOALS[c]
                rates = f"{r['ram']:>10,.0f} {r['ram_load']:>10,.0f} {r['chunked']:>10,.0f}"
                load = f"{r['cold']:>5.2f}/{r['load']:<5.2f}"
                verdict = "ok" if r["ram"] >= goal else "MISS"
                print(
                    f"{c:>5} {n:>6} {a:>2} {backend:<7} {rates} {r['random']:>8,.0f} {load} "
                    f"{size / 2**20:>5.0f}  {goal:,} {verdict}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
