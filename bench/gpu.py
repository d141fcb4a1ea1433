"""One-shot GPU benchmark (run through bench/gpu.sh): precompute and distill on CUDA for two
scenarios, one table. Not a test.

  imagenet-like  resnet34 -> resnet18, synthetic JPEGs (imagefolder), rrc-flip at 224
  cifar-like     resnet32x4 -> resnet8x4, synthetic CIFAR-100-format data, crop-flip at 32

Per scenario: stage 1 (`precompute.run`, steady chunk cycles) against the teacher's bare
forward on the same pre-made batches (bench/precompute.py), then bench/distill.py's modes
interleaved (kdcache CE / cached KD / online KD, the plain timm-style CE loop, timm's
LogitDistillationTask), with bf16 autocast, `--workers` = CPU cores. GPU utilisation is the
mean of `nvidia-smi` samples (every 200 ms) over each stage, when nvidia-smi exists.

    bench/gpu.sh                      # the whole thing on CUDA, < 8 minutes
    GPU_BENCH_ANY_DEVICE=1 bench/gpu.sh --device cpu --tiny   # smoke run of it on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.models.factory import create_model  # noqa: E402
from kdcache.models.runtime import resolve_device  # noqa: E402
from kdcache.precompute.config import PrecomputeConfig  # noqa: E402

import bench.distill as bd  # noqa: E402
import bench.precompute as bp  # noqa: E402
from bench.common import write_cifar100, write_jpegs  # noqa: E402

SCENARIOS = {
    "imagenet-like": dict(
        teacher="resnet34", student="resnet18", imagefolder=True, image_size=224, n=4096,
        batch_size=256, num_augs=2,
    ),
    "cifar-like": dict(
        teacher="resnet32x4", student="resnet8x4", imagefolder=False, image_size=32, n=8192,
        batch_size=64, num_augs=4,
    ),
}  # fmt: skip


class GpuUtil:
    """Mean GPU utilisation (%) from `nvidia-smi` samples while the block runs (None without)."""

    def __enter__(self) -> GpuUtil:
        self.value, self.proc = None, None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        vals = [float(x) for x in out.split() if x.strip().replace(".", "", 1).isdigit()]
        self.value = statistics.mean(vals) if vals else None


def precompute_ratio(sc: dict, args, tmp: Path) -> tuple[float, float]:
    """(precompute steady views/s, bare forward steady views/s) of the scenario's teacher."""
    if sc["imagefolder"]:
        write_jpegs(tmp / "pdata", sc["n"])
        data = dict(dataset="imagefolder", augment="rrc-flip", image_size=sc["image_size"])
    else:
        write_cifar100(tmp / "pdata", sc["n"])
        data = dict(dataset="cifar100")
    torch.manual_seed(0)
    teacher, _ = create_model(sc["teacher"], num_classes=100)
    torch.save(teacher.state_dict(), tmp / "t.pt")
    cfg = PrecomputeConfig(
        teacher=sc["teacher"], weights=str(tmp / "t.pt"), out=str(tmp / "p.zarr"),
        data_root=str(tmp / "pdata"), num_augs=sc["num_augs"], chunk_samples=512,
        batch_size=256, workers=args.workers, device=args.device, amp=True, overwrite=True,
        **data,
    )  # fmt: skip
    device = resolve_device(args.device)
    model, chunks = bp.premade_chunks(cfg, device, sc["n"] * sc["num_augs"])
    bp.warm_up(model, chunks, device, True, seconds=2.0)
    bare, cycles = [], []
    for _ in range(args.repeats):
        bare += bp.bare_forward(model, chunks, device, True)
        cycles += bp.precompute_once(cfg)[0]
    steady = lambda pairs: statistics.median(v / t for v, t in pairs)  # noqa: E731
    return steady(cycles), steady(bare)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile (adds minutes)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and models: smoke run")
    ap.add_argument("--only", choices=sorted(SCENARIOS), default=None)
    args = ap.parse_args()
    if args.tiny:
        args.repeats = 1
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # as both stages set it on CUDA
    t_all = time.perf_counter()
    header(args)  # each row is printed when its scenario is done: a timeout keeps the rest
    for name, sc in SCENARIOS.items():
        if args.only and name != args.only:
            continue
        sc = dict(sc)
        if args.tiny:  # the same code paths (JPEG loader + rrc-flip, in-RAM crop-flip)
            sc.update(n=100, batch_size=16, num_augs=2, image_size=32)  # 100 classes
            sc.update(teacher="resnet8", student="resnet8")
        tmp = Path(tempfile.mkdtemp(prefix=f"kdcache-gpu-{name}-"))
        try:  # progress bars go to a buffer: a remote runner keeps only the output's tail
            with GpuUtil() as u1, contextlib.redirect_stderr(io.StringIO()):
                pre, bare = precompute_ratio(sc, args, tmp)
            dargs = bd.parser().parse_args([])
            for k in ("teacher", "student", "n", "num_augs", "batch_size", "imagefolder"):
                setattr(dargs, k, sc[k])
            dargs.image_size, dargs.device = sc["image_size"], args.device
            dargs.repeats, dargs.compile = args.repeats, args.compile
            dargs.workers = args.workers  # DataLoader processes (JPEG); prefetch depth (RAM)
            with GpuUtil() as u2, contextlib.redirect_stderr(io.StringIO()):
                res = bd.measure(dargs)
            row(name, dargs, res, pre, bare, u1.value, u2.value)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    print(
        "goals: cach/CE >= 0.97 (GPU), CE/bare >= 0.80 (resnet18@224), CE/pl >= 0.98, "
        "cach/on >= 0.97 x ideal, pre/bare >= 0.90"
    )


HEAD = (
    f"{'scenario':<14} {'CE':>7} {'cached':>7} {'online':>7} {'plain':>7} {'timm-on':>7} "
    f"{'bare':>7} {'cach/CE':>7} {'CE/bare':>7} {'CE/pl':>6} {'cach/on':>7} {'ideal':>6} "
    f"{'pre/bare':>8} {'util-pre':>8} {'util-dist':>9}"
)


def header(args) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"\nkdcache GPU benchmark on {gpu}, device {args.device}, bf16 autocast, compile "
        f"{args.compile}, workers {args.workers}, {args.repeats} interleaved repeats"
    )
    print("distill: student samples/s (bare: one pre-made batch, fwd+bwd+step alone);")
    print("pre/bare: stage-1 views/s over the teacher's forward on pre-made view batches")
    print(HEAD)
    print("-" * len(HEAD), flush=True)


def row(name: str, dargs, res: dict, pre: float, bare_fwd: float, u1, u2) -> None:
    r = res["rates"]
    ce, ca = r["CE only"], r[f"cache {dargs.loss}"]
    on, pl, tm = r[f"online {dargs.loss}"], r["plain CE"], r["timm online"]
    bare = dargs.batch_size / res["t_student"]
    ideal = (res["t_student"] + res["t_teacher"]) / res["t_student"]
    util = lambda v: "n/a" if v is None else f"{v:.0f}%"  # noqa: E731
    print(
        f"{name:<14} {ce:>7.0f} {ca:>7.0f} {on:>7.0f} {pl:>7.0f} {tm:>7.0f} {bare:>7.0f} "
        f"{ca / ce:>7.3f} {ce / bare:>7.3f} {ce / pl:>6.3f} {ca / on:>7.3f} {ideal:>6.3f} "
        f"{pre / bare_fwd:>8.3f} {util(u1):>8} {util(u2):>9}",
        flush=True,
    )


if __name__ == "__main__":
    main()
