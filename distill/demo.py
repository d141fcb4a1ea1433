"""`make demo`: the main job end to end on the built-in digits data with a local zarr cache.

Trains a teacher (`distill --loss ce`), caches its logits under seeded views (`precompute`),
distills a small student with ce, kd and wsl from the cache, prints a table, and says where
each run's folder and report figure are (plus one figure comparing the students). Every stage
runs through the real CLI in a subprocess, exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kdcache.distill.plots import compare_runs

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> tuple[str, float]:
    """Run `python cli.py ARGS`; return stdout and wall seconds (fail loudly)."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    print("$ " + " ".join(["python cli.py", *args]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"demo step failed (exit {p.returncode}): {' '.join(args)}")
    print(p.stdout.strip(), flush=True)
    return p.stdout, time.perf_counter() - t0


def rel(p: Path) -> str:
    """A path as the user can type it from the repository root."""
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def last_record(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_runs", help="Where runs and the cache go.")
    ap.add_argument("--teacher", default="resnet20")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--student-epochs", type=int, default=8)
    ap.add_argument("--num-augs", type=int, default=4)
    a = ap.parse_args()
    out = ROOT / a.out
    shutil.rmtree(out, ignore_errors=True)
    common = [
        "--dataset",
        "digits",
        "--batch-size",
        "64",
        "--schedule",
        "cosine",
        "--lr",
        "0.05",
        "--weight-decay",
        "5e-4",
        "--overwrite",  # a rerun of the demo replaces its runs
    ]
    rows = []
    runs = {"teacher " + a.teacher: out / "teacher"}
    _, t = cli(
        "distill",
        "--student",
        a.teacher,
        "--loss",
        "ce",
        "--epochs",
        str(a.teacher_epochs),
        "--out",
        str(out / "teacher"),
        *common,
    )
    rec = last_record(out / "teacher")
    rows.append(("teacher " + a.teacher, "ce", rec["test_acc"], t, rec["samples_per_s"]))
    stdout, t = cli(
        "precompute",
        "--teacher",
        a.teacher,
        "--weights",
        str(out / "teacher" / "best.pt"),
        "--dataset",
        "digits",
        "--num-augs",
        str(a.num_augs),
        "--augment",
        "crop-flip",
        "--chunk-samples",
        "256",
        "--out",
        str(out / "caches"),
    )
    cache = next(ln.split(None, 1)[1] for ln in stdout.splitlines() if ln.startswith("cache "))
    views = next(ln for ln in stdout.splitlines() if ln.startswith("time ")).split("(")[-1]
    rows.append(("precompute", f"{a.num_augs} views", float("nan"), t, float(views.split()[0])))
    cli("cache", "verify", cache)
    for loss in ("ce", "kd", "wsl"):
        run_dir = out / f"student-{loss}"
        _, t = cli(
            "distill",
            "--student",
            a.student,
            "--loss",
            loss,
            "--cache",
            cache,
            "--epochs",
            str(a.student_epochs),
            "--out",
            str(run_dir),
            *common,
        )
        runs[f"student {a.student} {loss}"] = run_dir
        rec = last_record(run_dir)
        rows.append((f"student {a.student}", loss, rec["test_acc"], t, rec["samples_per_s"]))
    print("\nkdcache demo (digits, CPU)")
    print(f"{'run':<20} {'loss':<8} {'test acc':>9} {'wall s':>8} {'samples/s':>10}")
    for name, loss, acc, secs, sps in rows:
        acc_s = "-" if acc != acc else f"{acc:.4f}"
        print(f"{name:<20} {loss:<8} {acc_s:>9} {secs:>8.1f} {sps:>10.0f}")
    students = {k.split()[-1]: v for k, v in runs.items() if k.startswith("student")}
    title = f"{a.student} students of {a.teacher} (digits, {a.student_epochs} epochs)"
    compare = compare_runs(students, out / "students.png", title)
    print(f"\ncache: {cache}")
    print(
        "\nfigures (each run folder also holds config.yaml, metrics.jsonl/csv, best.pt, last.pt):"
    )
    for name, run_dir in runs.items():
        print(f"  {name:<20} {rel(run_dir / 'report.png')}")
    print(f"  {'students compared':<20} {rel(compare)}")


if __name__ == "__main__":
    main()
