"""`make science`: the study the README's method table comes from, on the bundled digits data.

The demo recipe (distill/demo.py): a resnet20 teacher trained 8 epochs, its logits cached for
4 crop-flip views, then resnet8 students for 8 epochs with every loss that a resnet20 cache
serves, plus tfkd-self from a resnet8 self-teacher's cache (same views; the self-teacher is
trained exactly like the CE students, on the cached views, with its own seed), 10 seeds each,
paired against ce; then the LSR-OS-TC check — one hyper-parameter set on two students (resnet8,
resnet14). Every stage goes through the real CLI and is resumable: rerun the same command to
finish an interrupted study (finished runs are skipped; the report is rebuilt).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOSSES = "ce,kd,wsl,lsr,tfkd-reg,tfkd-self,lsr-os,lsr-os-tc,mrkd"
SELF_SEED = 100  # the resnet8 self-teacher's seed, outside the students' 0-9
COMMON = ["--dataset", "digits", "--batch-size", "64", "--schedule", "cosine", "--lr", "0.05",
          "--weight-decay", "5e-4"]  # fmt: skip


def cli(*args: str) -> str:
    """Run `python cli.py ARGS` (fail loudly); return its stdout."""
    print("$ python cli.py " + " ".join(args), flush=True)
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    print(p.stdout.strip(), flush=True)
    if p.returncode != 0:
        sys.exit(f"science step failed (exit {p.returncode}): {' '.join(args)}")
    return p.stdout


def teacher_cache(out: Path, model: str, seed: int, epochs: int, views: str | None = None,
                  name: str = "teacher") -> str:  # fmt: skip
    """Train a teacher with plain CE (resumed if killed) and cache its logits; the cache path.
    Every cache uses the same view seed, so all students see the same views. With `views` (a
    cache) the teacher trains on that cache's views, exactly as the study's CE students do."""
    run = out / f"{name}-{model}"
    log = run / "metrics.jsonl"
    if not log.exists() or len(log.read_text().splitlines()) < epochs:
        resume = ["--resume"] if (run / "last.pt").exists() else []
        on = ["--cache", views] if views else []
        cli("distill", "--student", model, "--loss", "ce", "--epochs", str(epochs), "--seed",
            str(seed), "--out", str(run), "--no-plots", *on, *resume, *COMMON)  # fmt: skip
    stdout = cli("precompute", "--teacher", model, "--weights", str(run / "best.pt"),
                 "--dataset", "digits", "--num-augs", "4", "--augment", "crop-flip",
                 "--chunk-samples", "256", "--out", str(out / "caches"))  # fmt: skip
    return next(ln.split(None, 1)[1] for ln in stdout.splitlines() if ln.startswith("cache "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/science", help="Study folder (rerun to resume).")
    ap.add_argument("--seeds", default="0-9", help="Student seeds.")
    ap.add_argument("--epochs", type=int, default=8, help="Teacher and student epochs.")
    ap.add_argument("--jobs", type=int, default=0, help="Parallel runs (0: one per core).")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    cache = teacher_cache(out, "resnet20", 0, a.epochs)
    # Tf-KD self: the student's own architecture "trained in the normal way", i.e. the very
    # recipe of the CE baseline (on the cached views), seed SELF_SEED; then its logits cached
    self_cache = teacher_cache(out, "resnet8", SELF_SEED, a.epochs, views=cache, name="self")
    study = ["study", "--cache", cache, "--seeds", a.seeds, "--epochs", str(a.epochs),
             "--jobs", str(a.jobs), "--out", str(out), *COMMON]  # fmt: skip
    cli(*study, "--losses", LOSSES, "--loss-cache", f"tfkd-self={self_cache}", "--name", "science",
        "--compare", "wsl:kd,lsr-os:lsr,lsr-os-tc:lsr,lsr-os-tc:lsr-os")  # fmt: skip
    cli(*study, "--losses", "lsr,lsr-os-tc", "--students", "resnet8,resnet14",
        "--name", "lsr-check")  # fmt: skip
    print(f"\nreports: {out}/science.md, {out}/lsr-check.md")


if __name__ == "__main__":
    main()
