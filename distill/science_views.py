"""`make science-views`: how many cached views does a student need under strong augmentation?

Issue 18's question ("a good teacher is patient and consistent", Beyer et al. 2022): a
resnet20 teacher (plain CE, crop-flip) is cached for A = 1, 2, 4, 8, 16 views per digit under
crop-flip + RandAugment (rand-m9-mstd0.5-inc1) + Mixup 0.8 / CutMix 1.0 (stage 1 feeds the
teacher the mixed image); resnet8 students distill (kd) from each cache, one cached view per
sample per epoch. The upper bound is online KD with the same augmentation (a fresh view each
epoch, the teacher run on the very mixed image); the floor is CE with the same augmentation
and no teacher. Every variant runs the same seeds (paired: same init and batch order), and
the report pairs every variant against the online bound. Storage is the bytes of each cache
on disk. Everything goes through the real CLI / study runner and is resumable: rerun the same
command to finish (finished runs are skipped; the report is rebuilt).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdcache.distill.science import cli

AUGS = (1, 2, 4, 8, 16)
STRONG = {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0}
TRAIN = {"dataset": "digits", "batch_size": 64, "schedule": "cosine", "lr": 0.05,
         "weight_decay": 5e-4, "device": "cpu"}  # fmt: skip
ONLINE, CE = "online", "ce (no teacher)"


def _flags(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in ("--" + k.replace("_", "-"), str(v))]


def teacher(out: Path, epochs: int) -> Path:
    """The resnet20 teacher (plain CE, crop-flip, seed 0), resumed if killed; its best.pt."""
    run = out / "teacher-resnet20"
    log = run / "metrics.jsonl"
    if not log.exists() or len(log.read_text().splitlines()) < epochs:
        resume = ["--resume"] if (run / "last.pt").exists() else []
        cli("distill", "--student", "resnet20", "--loss", "ce", "--epochs", str(epochs),
            "--seed", "0", "--out", str(run), "--no-plots", *resume, *_flags(TRAIN))  # fmt: skip
    return run / "best.pt"


def cache(out: Path, weights: Path, augs: int, n: int | None, mode: str = "pair") -> str:
    """The teacher's logits for `augs` strong views per sample (precompute resumes/skips).
    No identity view: with one, view 0 is the clean eval view and a cache of A views would
    train on 1/A clean images, which online KD (and the question) never does."""
    few = ["--max-samples", str(n)] if n else []
    stdout = cli("precompute", "--teacher", "resnet20", "--weights", str(weights),
                 "--dataset", "digits", "--augment", "crop-flip", "--num-augs", str(augs),
                 "--no-identity-view",  # every view strong: else 1/A of them are clean
                 *_flags(STRONG), "--mixup-mode", mode, "--chunk-samples", "256", *few,
                 "--out", str(out / f"caches-a{augs}"))  # fmt: skip
    return next(ln.split(None, 1)[1] for ln in stdout.splitlines() if ln.startswith("cache "))


def nbytes(path: str) -> int:
    """Bytes of a cache on disk (a zarr directory or one file)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def specs(out: Path, caches: dict[int, str], weights: Path, seeds, epochs: int,
          n: int | None) -> dict:  # fmt: skip
    """One study spec per variant label, all with the same seeds and training recipe."""
    from kdcache.distill.study import StudySpec

    base = {**TRAIN, "epochs": epochs, "max_samples": n}
    strong = {**base, **STRONG}
    online = {**strong, "teacher": "resnet20", "teacher_weights": str(weights)}
    out_of = lambda name: str(out / "students" / name)  # noqa: E731
    got = {f"kd, {a} view{'s' * (a > 1)}": StudySpec(out_of(f"a{a}"), ["kd"], seeds, cache=c,
                                                     distill=dict(base))
           for a, c in caches.items()}  # fmt: skip
    got[ONLINE] = StudySpec(out_of("online"), ["kd"], seeds, distill=online)
    got[CE] = StudySpec(out_of("ce"), ["ce"], seeds, distill=strong)
    return got


def train_all(plans: dict, jobs: int) -> int:
    """Every pending run of every variant, `jobs` at a time (one thread each when the cores
    are shared out); returns the number of runs that failed."""
    from kdcache.distill.study import _launch, _pending, cores, plan

    todo = [rc for spec in plans.values() for rc in _pending(spec, plan(spec))]
    # seed by seed (a partial study stays paired), the CE floor last (it is optional context)
    todo.sort(key=lambda t: (t[0].loss == "ce", t[0].seed))
    jobs = min(jobs or cores(), max(1, len(todo)))
    threads = max(1, cores() // jobs)
    print(f"{len(todo)} runs to train, {jobs} jobs x {threads} threads", flush=True)
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, (r, rc) in enumerate(pool.map(lambda t: _launch(*t, threads), todo)):
            ok = rc == 0 and r.result.exists()
            failed += not ok
            print(f"[{i + 1}/{len(todo)}] {r.dir} {'ok' if ok else 'FAILED'}", flush=True)
    return failed


def rows_of(plans: dict) -> list[dict]:
    """Finished runs, labelled by variant (paired across variants by seed)."""
    from kdcache.distill.study import plan
    from kdcache.distill.study_stats import load_results

    rows = []
    for label, spec in plans.items():
        for r in load_results(plan(spec)):
            rows.append({**r, "variant": label})
    return rows


def plot(summary: list[dict], rows: list[dict], sizes: dict[int, int], path: Path) -> None:
    """Accuracy vs cached views (log2 axis; dots = seeds, bars = mean ± std), the online bound
    and the CE floor as bands, storage on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {s["variant"]: s for s in summary}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rng = np.random.default_rng(0)
    xs, means, stds = [], [], []
    for a in sizes:
        label = f"kd, {a} view{'s' * (a > 1)}"
        if label not in by:
            continue
        ys = [r["test_acc"] for r in rows if r["variant"] == label]
        ax.scatter(a * 2 ** rng.uniform(-0.08, 0.08, len(ys)), ys, s=12, alpha=0.5, color="C0")
        s = by[label]
        xs.append(a), means.append(s["mean"])
        stds.append(0.0 if math.isnan(s["std"]) else s["std"])
    ax.errorbar(xs, means, yerr=stds, fmt="o-", color="C0", capsize=4,
                label="cached KD (one cached view per sample per epoch)")  # fmt: skip
    for name, color in ((ONLINE, "C3"), (CE, "C7")):
        if name in by:
            m, sd = by[name]["mean"], by[name]["std"]
            sd = 0.0 if math.isnan(sd) else sd
            ax.axhline(m, color=color, ls="--", label=f"{name}: {m:.3f} ± {sd:.3f}")
            ax.axhspan(m - sd, m + sd, color=color, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), [str(a) for a in sizes])
    ax.set_xlabel("cached views per sample (A)")
    ax.set_ylabel("student test accuracy (final epoch)")
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(sizes), [f"{sizes[a] / 1e6:.2f} MB" for a in sizes], fontsize=8)
    top.set_xlabel("cache size on disk")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from kdcache.distill.study import parse_seeds
    from kdcache.distill.study_stats import write_report

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/science-views", help="Study folder (rerun to resume).")
    ap.add_argument("--seeds", default="0-4", help="Student seeds (the same for every variant).")
    ap.add_argument("--epochs", type=int, default=8, help="Student epochs.")
    ap.add_argument("--teacher-epochs", type=int, default=8, help="Teacher epochs (plain CE).")
    ap.add_argument("--augs", default=",".join(map(str, AUGS)), help="Cached views per cache.")
    ap.add_argument("--max-samples", type=int, default=None,
                    help="Cache and train on the first N training digits [all 1438].")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=0, help="Parallel runs (0: one per core).")
    ap.add_argument("--report-only", action="store_true", help="Rebuild the report, train nothing.")
    ap.add_argument("--figure", default=None, help="Also write the figure here (the README's).")
    ap.add_argument("--mixup-mode", default="pair", choices=("pair", "elem"),
                    help="Partners of the caches' Mixup/CutMix (online KD is elem).")  # fmt: skip
    a = ap.parse_args()
    out = Path(a.out).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # teacher + precompute on a shared machine
    weights = teacher(out, a.teacher_epochs)
    augs = [int(x) for x in a.augs.split(",")]
    with ThreadPoolExecutor(max_workers=max(1, min(2, a.jobs or 2))) as pool:  # biggest first
        made = pool.map(lambda k: (k, cache(out, weights, k, a.max_samples, a.mixup_mode)),
                        sorted(augs)[::-1])  # fmt: skip
        caches = dict(sorted(made))
    sizes = {k: nbytes(c) for k, c in caches.items()}
    plans = specs(out, caches, weights, parse_seeds(a.seeds), a.epochs, a.max_samples)
    failed = 0 if a.report_only else train_all(plans, a.jobs)
    rows = rows_of(plans)
    for r in rows:
        k = next((k for k in augs if r["variant"].startswith(f"kd, {k} view")), None)
        r["cache_bytes"] = sizes.get(k, 0)
    rep = write_report(rows, out, "views", ONLINE, [])
    plot(rep["summary"], rows, sizes, out / "views.png")
    if a.figure:
        plot(rep["summary"], rows, sizes, Path(a.figure))
    storage = "\n".join(f"| {k} | {sizes[k]:,} |" for k in augs)
    md = rep["markdown"] + f"\n| cached views | cache bytes on disk |\n|---|---|\n{storage}\n"
    (out / "views.md").write_text(md)
    (out / "views_storage.json").write_text(json.dumps({str(k): sizes[k] for k in augs}))
    print(md + f"\nreport: {out}/views.md, {out}/views.png")
    if failed:
        raise SystemExit(f"{failed} runs failed; rerun to retry (see their log.txt)")


if __name__ == "__main__":
    main()
