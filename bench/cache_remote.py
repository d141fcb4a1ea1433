"""Part of bench/cache_read.py: sparse caches at C=1000 and chunk-aware reads from S3.

Run through `bench/cache_read.py` (--only sparse | s3). The S3 server is moto in its own
process on 127.0.0.1, so the client's CPU time is measured alone; S3 rates are also given
per wall-second (moto answers every request in Python, far slower than real S3).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from kdcache.cache.convert import convert
from kdcache.cache.reader import iter_epoch
from kdcache.cache.share import copy_cache
from kdcache.cache.store import open_cache
from kdcache.cache.tools import human_bytes

GOAL_SAMPLED = 0.10  # bytes per entry of --sampled vs dense float16


def _bench():
    from bench import cache_read  # the dense builder and rate helpers

    return cache_read


def _rates(path: str, storage_options: dict | None = None) -> dict:
    cr = _bench()
    with open_cache(path, storage_options=storage_options) as cache:
        t, w = time.process_time(), time.perf_counter()
        mem = cache.load()
        load_cpu, load_wall = time.process_time() - t, time.perf_counter() - w
        ram = cr.epoch_rate(mem)[0]
        t, w = time.process_time(), time.perf_counter()
        count = sum(len(s) for s, _a, _l in iter_epoch(cache, cr.BATCH, seed=0, epoch=0))
        chunked_cpu = count / max(time.process_time() - t, 1e-9)
        chunked_wall = count / max(time.perf_counter() - w, 1e-9)
        return {"ram": ram, "chunked": chunked_cpu, "chunked_wall": chunked_wall,
                "load_cpu": load_cpu, "load_wall": load_wall, "entry": cache.entry_bytes(),
                "kl": cache.attrs.get("sparse_kl") or {}}  # fmt: skip


def sparse_table(args) -> None:
    cr = _bench()
    c, n, a = 1000, (2_000 if args.quick else 20_000), 8
    print(
        f"\nsparse caches, C={c} N={n} A={a}, zarr, samples per CPU-second; teacher-like "
        "logits 2*N(0,1) + 10 on one class (top-1 prob ~0.75)"
    )
    head = (
        f"{'storage':<12} {'B/entry':>7} {'% fp16':>7} {'MiB':>6} {'RAM':>10} {'chunked':>10} "
        f"{'convert s':>9} {'KL T=1':>7} {'KL T=4':>7}  goal"
    )
    print(head + "\n" + "-" * len(head))
    tmp = tempfile.mkdtemp(prefix="kdcache-bench-sparse-")
    try:
        dense = os.path.join(tmp, "dense.zarr")
        cr.build(dense, n, a, c, args.chunk_samples, scale=2.0, peak=10.0)
        for name, kw in (("dense fp16", None), ("top-50", {"topk": 50}),
                         ("sampled-64", {"sampled": 64})):  # fmt: skip
            path, secs = dense, 0.0
            if kw:
                path = os.path.join(tmp, f"{name}.zarr")
                t = time.perf_counter()
                convert(dense, path, **kw)
                secs = time.perf_counter() - t
            r = _rates(path)
            frac = r["entry"] / (2 * c)
            size = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
            )
            goal = ""
            if name.startswith("sampled"):
                goal = f"<= {GOAL_SAMPLED:.0%} {'ok' if frac <= GOAL_SAMPLED else 'MISS'}"
            kl1, kl4 = r["kl"].get("T1", 0.0), r["kl"].get("T4", 0.0)
            print(
                f"{name:<12} {r['entry']:>7} {100 * frac:>6.1f}% {size / 2**20:>6.1f} "
                f"{r['ram']:>10,.0f} {r['chunked']:>10,.0f} {secs:>9.1f} {kl1:>7.3f} {kl4:>7.3f}"
                f"  {goal}",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _moto() -> tuple[subprocess.Popen, str]:
    from tests.clitools import free_port

    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, url


def remote_table(args) -> None:
    cr = _bench()
    c, n, a = 1000, (1_024 if args.quick else 4_096), 8
    proc, endpoint = _moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    so = {"client_kwargs": {"endpoint_url": endpoint}}
    tmp = tempfile.mkdtemp(prefix="kdcache-bench-s3-")
    print(f"\nS3 (moto server on 127.0.0.1), C={c} N={n} A={a}, zarr, chunks of "
          f"{args.chunk_samples}; rates in samples per second")  # fmt: skip
    head = (
        f"{'cache':<18} {'size':>9} {'push s':>7} {'load wall s':>11} {'RAM /cpu-s':>11} "
        f"{'chunked /cpu-s':>14} {'chunked /wall-s':>15}"
    )
    print(head + "\n" + "-" * len(head))
    try:
        import s3fs

        s3fs.S3FileSystem(**so).mkdir("bench")
        dense = os.path.join(tmp, "dense.zarr")
        cr.build(dense, n, a, c, args.chunk_samples, scale=2.0, peak=10.0)
        sampled = os.path.join(tmp, "sampled.zarr")
        convert(dense, sampled, sampled=64)
        for label, local in (("dense fp16", dense), ("sampled-64", sampled)):
            for where in ("local", "s3"):
                path, push = local, 0.0
                if where == "s3":
                    path = f"s3://bench/{os.path.basename(local)}"
                    t = time.perf_counter()
                    copy_cache(local, path, storage_options=so, progress=False)
                    push = time.perf_counter() - t
                r = _rates(path, so if where == "s3" else None)
                size = human_bytes(
                    open_cache(path, storage_options=so if where == "s3" else None)
                    ._b.size_bytes()
                )  # fmt: skip
                print(
                    f"{label + ' ' + where:<18} {size:>9} {push:>7.1f} {r['load_wall']:>11.2f} "
                    f"{r['ram']:>11,.0f} {r['chunked']:>14,.0f} {r['chunked_wall']:>15,.0f}",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
