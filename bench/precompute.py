"""Stage-1 throughput: full precompute vs the same teacher's bare forward, in one run. Not a test.

The issue's goal: precompute (view replay + teacher forward + cache writes) runs at >= 0.90 of
the teacher's bare forward on pre-made view batches. Data is a synthetic CIFAR-100-format
dataset written to a temp dir; the teacher is randomly initialised (one saved set of weights
for both measurements). Both use the same device, batch size, dtype and thread count, and are
interleaved `--repeats` times.

    .venv/bin/python bench/precompute.py [--quick] [--teacher resnet20] [--n 2048]
        [--num-augs 4] [--batch-size 256] [--chunk-samples 512] [--device auto] [--threads N]

Rows (views/s):
  bare forward     the teacher on the very view batches stage 1 computes, pre-made on the
                   device (inference_mode, logits copied to the host)
  precompute loop  `precompute.loop.run_chunks` inside `precompute.run.run`: view prep +
                   forward + cache writes
  precompute e2e   the same runs end to end (dataset load, model, spec, cache create/finalize)
Columns: steady = median over chunks (bare: one chunk's batches; precompute: one loop cycle,
from one chunk's logits to the next), robust to other jobs on a shared machine and what a
long run converges to; whole = best whole pass. The goal is checked on steady.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdcache.precompute.loop as ploop  # noqa: E402
import kdcache.precompute.run as prun  # noqa: E402
from kdcache.models.factory import create_model  # noqa: E402
from kdcache.models.runtime import resolve_device  # noqa: E402
from kdcache.precompute.config import PrecomputeConfig  # noqa: E402
from kdcache.precompute.setup import build_setup  # noqa: E402

from bench.common import write_cifar100  # noqa: E402

GOAL = 0.90


def config(args, root: Path, out: Path, weights: Path) -> PrecomputeConfig:
    return PrecomputeConfig(
        teacher=args.teacher,
        weights=str(weights),
        out=str(out),
        dataset="cifar100",
        data_root=str(root),
        num_augs=args.num_augs,
        chunk_samples=args.chunk_samples,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        overwrite=True,
    )


def premade_chunks(cfg: PrecomputeConfig, device: torch.device, max_views: int):
    """The teacher and the very view batches stage 1 computes, per chunk, on the device:
    cut in this thread (in-RAM data, batched policy) or by the same DataLoader worker
    processes stage 1 uses (decoded sources, per-sample policies such as rrc-flip)."""
    setup = build_setup(cfg, device)
    model = setup.model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    bs = max(1, min(cfg.batch_size, cfg.chunk_samples * cfg.num_augs))  # as stage 1 clamps it
    ranges = [
        (start, min(start + cfg.chunk_samples, setup.spec.n))
        for start in range(0, setup.spec.n, cfg.chunk_samples)
    ]
    made = (
        _batched_chunks(setup, ranges, bs) if setup.batched else _loader_chunks(setup, cfg, ranges)
    )
    chunks, views = [], 0
    for batches in made:
        on_dev = [ploop.to_device(b, device) for b in batches]
        if device.type == "cuda":  # as stage 1 feeds them (channels_last, like the model)
            on_dev = [b.contiguous(memory_format=torch.channels_last) for b in on_dev]  # images
        chunks.append(on_dev)
        views += sum(len(b) for b in batches)
        if views >= max_views:
            break
    return model, chunks


def _batched_chunks(setup, ranges, bs: int):
    for start, stop in ranges:
        yield ploop.prepare_chunk(setup, start, stop, bs)[1]


def _loader_chunks(setup, cfg: PrecomputeConfig, ranges):
    for batches in ploop.chunk_loader(setup, cfg, ranges):
        yield [b["views"] for b in batches]


def bare_forward(model, chunks, device: torch.device, amp: bool) -> list[tuple[int, float]]:
    """(views, seconds) per chunk of the teacher alone; like stage 1, a chunk's logits are
    copied to the host once it is done."""
    out = []
    with torch.inference_mode():
        for batches in chunks:
            t0 = time.perf_counter()
            logits = []
            for b in batches:
                cuda = device.type == "cuda"
                if b.dtype == torch.uint8:  # decoded views: scaled on the device, as stage 1
                    b = b.to(torch.float32).div_(255.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and cuda):
                    logits.append(ploop.forward(model, b).float())
            torch.cat(logits).cpu()
            out.append((sum(len(b) for b in batches), time.perf_counter() - t0))
    return out


def warm_up(model, chunks, device: torch.device, amp: bool, seconds: float = 3.0) -> None:
    """Until kernels, allocator and caches have settled."""
    t0, i = time.perf_counter(), 0
    while i < 4 or time.perf_counter() - t0 < seconds:
        bare_forward(model, [chunks[0][i % len(chunks[0]) :][:1]], device, amp)
        i += 1


def precompute_once(cfg: PrecomputeConfig) -> tuple[list[tuple[int, float]], float, float]:
    """One `precompute.run.run`: (views, seconds) per chunk cycle of the loop (from one chunk's
    logits to the next: waiting for its views, forward, queueing its write), loop seconds and
    end-to-end seconds."""
    marks: list[tuple[int, float]] = []
    loop_s: list[float] = []
    orig_loop, orig_logits = ploop.run_chunks, ploop.teacher_logits

    def timed_loop(*a, **k):
        marks.append((0, time.perf_counter()))
        try:
            return orig_loop(*a, **k)
        finally:
            loop_s.append(time.perf_counter() - marks[0][1])

    def timed_logits(setup, batches, *a, **k):
        out = orig_logits(setup, batches, *a, **k)  # batches may be a generator: count rows
        marks.append((len(out), time.perf_counter()))
        return out

    ploop.run_chunks, ploop.teacher_logits = timed_loop, timed_logits
    t0 = time.perf_counter()
    try:
        prun.run(cfg)
    finally:
        ploop.run_chunks, ploop.teacher_logits = orig_loop, orig_logits
    e2e = time.perf_counter() - t0
    cycles = [(v, t - marks[i][1]) for i, (v, t) in enumerate(marks[1:])]
    return cycles, loop_s[0], e2e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet20", help="CIFAR-zoo, timm or tv: name")
    ap.add_argument("--n", type=int, default=2048, help="samples of the synthetic dataset")
    ap.add_argument("--num-augs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-samples", type=int, default=512)
    ap.add_argument("--workers", type=int, default=0, help="precompute --workers")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements of each")
    ap.add_argument("--quick", action="store_true", help="n=512, 2 augs, chunk 128: smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.num_augs, args.repeats = min(args.n, 512), min(args.num_augs, 2), 1
        args.chunk_samples = min(args.chunk_samples, 128)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-pre-"))
    try:
        write_cifar100(tmp / "data", args.n)
        torch.manual_seed(0)  # one set of weights for both measurements
        teacher, _ = create_model(args.teacher, num_classes=100)
        torch.save(teacher.state_dict(), tmp / "teacher.pt")
        cfg = config(args, tmp / "data", tmp / "cache.zarr", tmp / "teacher.pt")
        model, chunks = premade_chunks(cfg, device, args.n * args.num_augs)
        warm_up(model, chunks, device, args.amp)
        res: dict[str, list] = {"bare": [], "cycles": [], "bare_pass": [], "loop": [], "e2e": []}
        for _ in range(args.repeats):
            bare = bare_forward(model, chunks, device, args.amp)
            res["bare"] += bare
            res["bare_pass"].append(rate(bare))
            cycles, loop_s, e2e_s = precompute_once(cfg)
            views = sum(v for v, _ in cycles)
            res["cycles"] += cycles
            res["loop"].append(views / loop_s)
            res["e2e"].append(views / e2e_s)
        report(args, device, res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rate(pairs: list[tuple[int, float]]) -> float:
    return sum(v for v, _ in pairs) / sum(t for _, t in pairs)


def report(args, device: torch.device, res: dict[str, list]) -> None:
    steady_bare = statistics.median(v / t for v, t in res["bare"])
    steady_pre = statistics.median(v / t for v, t in res["cycles"])
    best_bare = max(res["bare_pass"])
    print(
        f"teacher {args.teacher}, cifar100-format N={args.n} x A={args.num_augs} views, "
        f"batch {args.batch_size}, chunk {args.chunk_samples}, device {device}, "
        f"{torch.get_num_threads()} torch threads, workers {args.workers}, "
        f"{args.repeats} interleaved repeats"
    )
    print("steady: median over chunks (bare: a chunk's batches; precompute: one loop cycle)")
    print("whole: best whole pass (bare: all batches; precompute: loop / end to end)")
    head = f"{'views/s':<16} {'steady':>8} {'whole':>8} {'steady/bare':>12} {'whole/bare':>11}"
    print(head)
    print("-" * len(head))
    rows = (
        ("bare forward", steady_bare, best_bare),
        ("precompute loop", steady_pre, max(res["loop"])),
        ("precompute e2e", None, max(res["e2e"])),
    )
    for label, steady, whole in rows:
        s = f"{steady:>8,.0f} {steady / steady_bare:>12.3f}" if steady else f"{'':>8} {'':>12}"
        s = f"{s[:8]} {whole:>8,.0f}{s[8:]} {whole / best_bare:>11.3f}"
        print(f"{label:<16} {s}")
    ratio = steady_pre / steady_bare
    verdict = "ok" if ratio >= GOAL else "MISS"
    print(f"goal: precompute/bare (steady) >= {GOAL:.2f}: {ratio:.3f} {verdict}")


if __name__ == "__main__":
    main()
