"""A study's report: per-variant metric (mean ± std, min/max, n) and paired comparisons.

Runs are paired by (student, seed): with the same seed two losses see the same init, the same
batch order and the same views, so the per-seed difference removes most of the seed noise.
For each pair: mean difference, wins/ties/n, a paired t-test and a Wilcoxon signed-rank test
(scipy; two-sided). The metric is test accuracy for classifiers (a win: higher) and held-out
perplexity ``test_ppl`` for LM students (a win: lower). Written as Markdown, CSV (summary and
per run), JSON and a PNG.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
METRIC = "test_acc"
LOWER_IS_BETTER = {"test_ppl", "test_loss", "best_ppl"}
TITLES = {"test_acc": "Test accuracy", "test_ppl": "Held-out perplexity"}


def load_results(runs) -> list[dict]:
    """One row per finished planned run: student, variant, loss, seed and its result."""
    rows = []
    for r in runs:
        if r.result.exists():
            res = json.loads(r.result.read_text())
            rows.append(
                {"student": r.student, "variant": r.variant, "loss": r.loss, "seed": r.seed, **res}
            )
    return rows


def summarize(rows: list[dict], metric: str = METRIC) -> list[dict]:
    """Per (student, variant), grouped by student, in first-seen order: n, mean, std (n−1),
    min, max."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if metric in r:
            groups.setdefault((r["student"], r["variant"]), []).append(float(r[metric]))
    students = list(dict.fromkeys(s for s, _ in groups))
    out = []
    for (student, variant), vals in sorted(groups.items(), key=lambda g: students.index(g[0][0])):
        a = np.asarray(vals)
        out.append(
            {
                "student": student,
                "variant": variant,
                "n": len(a),
                "mean": float(a.mean()),
                "std": float(a.std(ddof=1)) if len(a) > 1 else math.nan,
                "min": float(a.min()),
                "max": float(a.max()),
            }
        )
    return out


def paired(rows: list[dict], a: str, b: str, student: str, metric: str = METRIC) -> dict | None:
    """Variant `a` minus variant `b` on the seeds both finished; None if none shared. A win is
    a seed where `a` is better: higher, or lower for a metric in LOWER_IS_BETTER."""
    from scipy import stats

    mine = [r for r in rows if r["student"] == student and metric in r]
    va = {r["seed"]: r[metric] for r in mine if r["variant"] == a}
    vb = {r["seed"]: r[metric] for r in mine if r["variant"] == b}
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    d = np.asarray([va[s] - vb[s] for s in seeds], dtype=np.float64)
    p_t = p_w = math.nan
    if np.all(d == 0):
        p_t = p_w = 1.0  # identical results: no evidence of a difference
    elif len(d) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant non-zero differences: t-test p is nan
            p_t = float(stats.ttest_rel([va[s] for s in seeds], [vb[s] for s in seeds]).pvalue)
            p_w = float(stats.wilcoxon(d).pvalue)
    return {
        "student": student,
        "a": a,
        "b": b,
        "n": len(d),
        "mean_diff": float(d.mean()),
        "wins": int((d < 0).sum() if metric in LOWER_IS_BETTER else (d > 0).sum()),
        "ties": int((d == 0).sum()),
        "p_ttest": p_t,
        "p_wilcoxon": p_w,
    }


def comparisons(
    rows: list[dict], baseline: str, extra: list[tuple[str, str]], metric: str = METRIC
) -> list[dict]:
    """Every variant against the baseline on each student, then the extra (a, b) pairs."""
    out = []
    for s in summarize(rows, metric):
        if s["variant"] != baseline:
            c = paired(rows, s["variant"], baseline, s["student"], metric)
            if c is not None:
                out.append(c)
    students = list(dict.fromkeys(r["student"] for r in rows))
    for a, b in extra:
        for st in students:
            c = paired(rows, a, b, st, metric)
            if c is not None:
                out.append(c)
    return out


def _f(x: float, nd: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _p(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "–"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def markdown(summary: list[dict], comps: list[dict], baseline: str, metric: str = METRIC) -> str:
    """The summary table, then one line per comparison (a − b)."""
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [
        f"{TITLES.get(metric, metric)} (`{metric}`, {better} is better) of the final epoch; "
        f"paired by seed against `{baseline}` (two-sided p; a win: {better} {metric}).",
        "",
        f"| student | loss | n | {metric} mean ± std | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['student']} | {s['variant']} | {s['n']} | {_f(s['mean'])} ± {_f(s['std'])} "
            f"| {_f(s['min'])} | {_f(s['max'])} |"
        )
    lines += [
        "",
        "| student | comparison | n | mean diff | wins / ties / n | t-test p | Wilcoxon p |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comps:
        lines.append(
            f"| {c['student']} | {c['a']} − {c['b']} | {c['n']} | {c['mean_diff']:+.4f} "
            f"| {c['wins']} / {c['ties']} / {c['n']} | {_p(c['p_ttest'])} | {_p(c['p_wilcoxon'])} |"
        )
    return "\n".join(lines) + "\n"


def _csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], summary: list[dict], path: Path, metric: str = METRIC) -> None:
    """The metric by (student, loss): one dot per seed, the mean ± std as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['variant']}\n{s['student']}" for s in summary]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    rng = np.random.default_rng(0)
    for i, s in enumerate(summary):
        ys = [
            r[metric]
            for r in rows
            if r["student"] == s["student"] and r["variant"] == s["variant"] and metric in r
        ]
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(ys)), ys, s=14, alpha=0.7, color="C0")
        std = 0.0 if math.isnan(s["std"]) else s["std"]
        ax.errorbar(i, s["mean"], yerr=std, fmt="_", color="C3", markersize=18, capsize=4)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(f"{TITLES.get(metric, metric).lower()} (final epoch)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    rows: list[dict], out: Path, name: str, baseline: str, extra: list[tuple[str, str]],
    metric: str = METRIC,
) -> dict:  # fmt: skip
    """OUT/NAME.md, NAME.csv (summary), NAME_comparisons.csv, NAME_runs.csv, NAME.json (all of
    it), NAME.png."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, metric)
    comps = comparisons(rows, baseline, extra, metric)
    md = markdown(summary, comps, baseline, metric)
    (out / f"{name}.md").write_text(md)
    _csv(out / f"{name}.csv", summary)
    _csv(out / f"{name}_comparisons.csv", comps)
    _csv(out / f"{name}_runs.csv", rows)
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    doc = {"metric": metric, "better": better, "baseline": baseline, "summary": summary,
           "comparisons": comps, "runs": rows}  # fmt: skip
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(_clean(doc), indent=1, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(out / f"{name}.json")
    if rows:
        plot(rows, summary, out / f"{name}.png", metric)
    return {"summary": summary, "comparisons": comps, "markdown": md, "runs": len(rows),
            "metric": metric}  # fmt: skip


def _clean(x):
    """NaN/inf (std of one seed, p of one pair) -> null: the file stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x
