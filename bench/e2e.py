"""`bench/distill.py --e2e`: the `distill` command as users run it vs plain timm-style loops,
each a fresh process, epoch-2 samples/s, median of interleaved rounds. Not a test.

Rows (each its own subprocess, 2 epochs of digits, batch 64, crop-flip; rate = epoch 2):
  kdcache CE      `cli.py distill --loss ce`: its own samples/s from OUT/metrics.jsonl
  kdcache cached  `cli.py distill --loss kd --cache C` (C precomputed once, not timed)
  plain CE        bench/timm_loops.PeerMode: normalize, forward, CE, backward, step
  plain CE, held  the same with distill's CPU allocator setting (models/malloc.hold_heap)
  timm online     timm's LogitDistillationTask with the teacher in memory
ideal = (student step + teacher forward) / student step, timed alone in the online peer.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], check=True,
                   capture_output=True, cwd=ROOT)  # fmt: skip


def _distill(args, tmp: Path, name: str, extra: list[str]) -> float:
    out = tmp / name
    shutil.rmtree(out, ignore_errors=True)
    _cli("distill", "--student", args.student, "--dataset", "digits", "--epochs", 2,
         "--batch-size", args.batch_size, "--device", args.device, "--out", out, "--no-plots",
         *extra)  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return float([r for r in rows if "samples_per_s" in r][-1]["samples_per_s"])


def _peer(args, weights: str | None, hold: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", "--student", args.student,
           "--batch-size", str(args.batch_size), "--device", args.device]  # fmt: skip
    cmd += ["--hold-heap"] if hold else []
    if weights:
        cmd += ["--teacher", args.teacher, "--weights", weights]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def peer_main(argv: list[str]) -> None:
    """In the subprocess: 2 epochs of a peer loop; prints {"rate": epoch-2 samples/s, ...}."""
    import argparse

    import torch

    sys.path.insert(0, str(ROOT))
    from kdcache.distill.config import DistillConfig
    from kdcache.models.factory import create_model
    from kdcache.models.runtime import init_runtime

    from bench.timm_loops import PeerMode

    ap = argparse.ArgumentParser()
    for k in ("--student", "--device", "--teacher", "--weights"):
        ap.add_argument(k)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--hold-heap", action="store_true")
    a = ap.parse_args(argv)
    rt = init_runtime(a.device)
    if a.hold_heap and rt.device.type == "cpu":  # what distill does on the CPU
        from kdcache.models.malloc import hold_heap

        hold_heap()
    cfg = DistillConfig(student=a.student, dataset="digits", loss="ce", epochs=2,
                        batch_size=a.batch_size, device=a.device)  # fmt: skip
    teacher = None
    if a.weights:
        teacher, _ = create_model(a.teacher, num_classes=10, weights=a.weights)
    m = PeerMode("peer", cfg, rt, teacher)
    m.epoch(0)
    m.epoch(1)
    out = {"rate": m.epochs[-1]}
    if teacher is not None:  # the ideal's parts, each alone on one batch
        x = torch.rand(a.batch_size, 3, 32, 32, device=rt.device)
        y = torch.randint(0, 10, (a.batch_size,), device=rt.device)
        t_net = teacher.to(rt.device).eval()
        ts, tt = [], []
        for _ in range(7):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(m.model(x), y)
            m.opt.zero_grad(set_to_none=True)
            loss.backward()
            m.opt.step()
            t1 = time.perf_counter()
            with torch.inference_mode():
                t_net(x)
            t2 = time.perf_counter()
            ts.append(t1 - t0)
            tt.append(t2 - t1)
        s, t = statistics.median(ts[2:]), statistics.median(tt[2:])
        out["ideal"] = (s + t) / s
    print(json.dumps(out))


def run(args) -> None:
    """Precompute once, then `--repeats` interleaved rounds of the four rows; print the table."""
    import torch

    sys.path.insert(0, str(ROOT))
    from kdcache.models.factory import create_model

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-e2e-"))
    try:
        torch.manual_seed(1)
        teacher, _ = create_model(args.teacher, num_classes=10)
        weights = str(tmp / "teacher.pt")
        torch.save(teacher.state_dict(), weights)
        cache = tmp / "teacher.zarr"
        _cli("precompute", "--dataset", "digits", "--teacher", args.teacher, "--weights", weights,
             "--num-augs", args.num_augs, "--device", args.device, "--out", cache)  # fmt: skip
        rates: dict[str, list[float]] = {}
        ideals = []
        for _ in range(args.repeats):
            rates.setdefault("kdcache CE", []).append(_distill(args, tmp, "ce", ["--loss", "ce"]))
            rates.setdefault("plain CE", []).append(_peer(args, None)["rate"])
            rates.setdefault("plain CE, held heap", []).append(_peer(args, None, True)["rate"])
            kd = ["--loss", "kd", "--cache", str(cache)]
            rates.setdefault("kdcache cached kd", []).append(_distill(args, tmp, "kd", kd))
            on = _peer(args, weights)
            rates.setdefault("timm online kd", []).append(on["rate"])
            ideals.append(on["ideal"])
        med = {k: statistics.median(v) for k, v in rates.items()}
        ideal = statistics.median(ideals)
        print(f"e2e: {args.teacher} -> {args.student}, digits, batch {args.batch_size}, "
              f"device {args.device}, epoch-2 samples/s, median of {args.repeats} interleaved "
              "rounds (each a fresh process)")  # fmt: skip
        for k, v in rates.items():
            print(f"{k:<20} {med[k]:>9,.1f}   rounds: {', '.join(f'{x:,.0f}' for x in v)}")
        ce, plain = med["kdcache CE"], med["plain CE"]
        cached, online = med["kdcache cached kd"], med["timm online kd"]
        pairs = zip(rates["kdcache CE"], rates["plain CE"], strict=True)
        paired = statistics.median(a / b for a, b in pairs)
        print(f"{'kdcache CE / plain':<28} {ce / plain:.3f}  goal >= 0.98  (median of the "
              f"per-round ratios {paired:.3f}: the machine drifts between processes)")  # fmt: skip
        held = med["plain CE, held heap"]
        print(f"{'kdcache CE / plain, held':<28} {ce / held:.3f}  (the plain loop with distill's "
              "CPU allocator setting, models/malloc.hold_heap: like for like)")  # fmt: skip
        print(f"{'cached / kdcache CE':<28} {cached / ce:.3f}")
        print(f"{'ideal (s+t)/s':<28} {ideal:.3f}")
        print(f"{'cached / timm online':<28} {cached / online:.3f}  goal >= 0.97 x ideal "
              f"= {0.97 * ideal:.3f} ({cached / online / ideal:.3f} of ideal)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__" and "--peer" in sys.argv:
    peer_main([x for x in sys.argv[1:] if x != "--peer"])
