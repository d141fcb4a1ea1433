"""Stage-1 throughput: full precompute vs the same teacher's bare forward, in one run. Not a test.

The issue's goal: precompute (view replay + teacher forward + cache writes) runs at >= 0.90 of
the teacher's bare forward on pre-made view batches. Data is a synthetic CIFAR-100-format
dataset written to a temp dir; the teacher is randomly initialised (speed does not depend on
the weights). Both measurements use the same device, batch size, dtype and thread count and
are interleaved `--repeats` times; the best of each is compared (the development VM is shared).

    .venv/bin/python bench/precompute.py [--quick] [--teacher resnet20] [--n 2048]
        [--num-augs 4] [--batch-size 256] [--chunk-samples 512] [--device auto]

Rows:
  bare forward       teacher on view batches already on the device (inference_mode), views/s
  precompute loop    `precompute.run.run`, the chunk loop only (prep + forward + writes)
  precompute e2e     the same run end to end: dataset load, model, spec, cache create/finalize
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import precompute.run as prun  # noqa: E402
from precompute.config import PrecomputeConfig  # noqa: E402
from precompute.runtime import resolve_device  # noqa: E402
from precompute.setup import build_setup  # noqa: E402

GOAL = 0.90


def write_cifar100(root: Path, n: int, seed: int = 0) -> None:
    """Random uint8 images in CIFAR-100's python-pickle layout (train: n, test: 16)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train", n), ("test", 16)):
        labels = [int(v) for v in rng.integers(0, 100, count)]
        data = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [v // 5 for v in labels],
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(data, f, protocol=4)
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=4)


def config(args, root: Path, out: Path) -> PrecomputeConfig:
    return PrecomputeConfig(
        teacher=args.teacher,
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


def premade_batches(cfg: PrecomputeConfig, device: torch.device, max_views: int):
    """The teacher and the very view batches stage 1 computes, already on the device."""
    setup = build_setup(cfg, device)
    model = setup.model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batches, views = [], 0
    for start in range(0, setup.spec.n, cfg.chunk_samples):
        stop = min(start + cfg.chunk_samples, setup.spec.n)
        for b in prun.prepare_chunk(setup, start, stop, cfg.batch_size)[1]:
            batches.append(prun.to_device(b, device))
            views += len(b)
        if views >= max_views:
            break
    return model, batches, views


def bare_forward(model, batches, views: int, device: torch.device, amp: bool) -> float:
    """views/s of the teacher alone (logits copied back to the host, as stage 1 must)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                prun.forward(model, b).float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return views / (time.perf_counter() - t0)


def warm_up(model, batches, device: torch.device, amp: bool, seconds: float = 3.0) -> None:
    """Until the allocator has settled: glibc hands fresh pages to the first forwards (page
    faults cost ~3x the forward itself on the development VM)."""
    t0, i = time.perf_counter(), 0
    while i < 4 or time.perf_counter() - t0 < seconds:
        bare_forward(model, batches[i % len(batches) : i % len(batches) + 1], 1, device, amp)
        i += 1


def precompute_once(cfg: PrecomputeConfig) -> tuple[float, float]:
    """(loop views/s, end-to-end views/s) of one `precompute.run.run`."""
    loop_s: list[float] = []
    orig = prun._loop

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            loop_s.append(time.perf_counter() - t)

    prun._loop = timed
    t0 = time.perf_counter()
    try:
        s = prun.run(cfg)
    finally:
        prun._loop = orig
    e2e = time.perf_counter() - t0
    views = s["computed_samples"] * s["shape"][1]
    return views / loop_s[0], views / e2e


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
    ap.add_argument("--repeats", type=int, default=2, help="interleaved measurements of each")
    ap.add_argument("--quick", action="store_true", help="n=512, 2 augs, 1 repeat: smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.num_augs, args.repeats = min(args.n, 512), min(args.num_augs, 2), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-pre-"))
    try:
        write_cifar100(tmp / "data", args.n)
        cfg = config(args, tmp / "data", tmp / "cache.zarr")
        model, batches, views = premade_batches(cfg, device, args.n * args.num_augs)
        warm_up(model, batches, device, args.amp)
        rates: dict[str, list[float]] = {"bare": [], "loop": [], "e2e": []}
        for _ in range(args.repeats):
            rates["bare"].append(bare_forward(model, batches, views, device, args.amp))
            loop, e2e = precompute_once(cfg)
            rates["loop"].append(loop)
            rates["e2e"].append(e2e)
        report(args, device, rates)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, device: torch.device, rates: dict[str, list[float]]) -> None:
    best = {k: max(v) for k, v in rates.items()}
    print(
        f"teacher {args.teacher}, cifar100-format N={args.n} x A={args.num_augs} views, "
        f"batch {args.batch_size}, chunk {args.chunk_samples}, device {device}, "
        f"{torch.get_num_threads()} torch threads, workers {args.workers}, "
        f"best of {args.repeats} interleaved"
    )
    head = f"{'measurement':<18} {'views/s':>9} {'median':>9} {'vs bare':>8}  goal"
    print(head)
    print("-" * len(head))
    rows = (("bare forward", "bare"), ("precompute loop", "loop"), ("precompute e2e", "e2e"))
    for label, key in rows:
        ratio = best[key] / best["bare"]
        goal = ""
        if key == "loop":
            goal = f">= {GOAL:.2f} {'ok' if ratio >= GOAL else 'MISS'}"
        med = statistics.median(rates[key])
        print(f"{label:<18} {best[key]:>9,.0f} {med:>9,.0f} {ratio:>8.3f}  {goal}")


if __name__ == "__main__":
    main()
