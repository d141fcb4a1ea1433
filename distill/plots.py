"""Figures of a distill run, readable in a report: `report.png` (every panel, titled with
student, teacher and loss) and one PNG per panel (`loss.png`, `accuracy.png`, `lr.png`,
`wsl.png`, `speed.png`). Epochs are 1-based integers (epoch 1 = after the first pass);
a panel whose curves differ by orders of magnitude uses a log axis and says so."""

from __future__ import annotations

import math
from pathlib import Path

LOSS_TERMS = ("loss", "ce", "kd", "soft", "reg", "test_loss")
LOG_RATIO = 10.0  # a log axis when the plotted values span this factor (an order of magnitude)
LABELS = {
    "loss": "total loss (train)",
    "ce": "CE term (train)",
    "kd": "KD term (train)",
    "soft": "soft term (train)",
    "test_loss": "CE (test)",
    "train_acc": "train (augmented views)",
    "test_acc": "test",
    "teacher_train_acc": "teacher on the replayed views",
    "weight_mean": "mean WSL sample weight",
    "reg_fraction": "regularization-sample fraction",
    "samples_per_s": "samples/s",
    "lr": "learning rate",
}


def run_title(cfg, teachers: list[str]) -> str:
    """`resnet8 ← resnet32x4 · loss kd (T=4, alpha=0.9) · cifar100/train`."""
    try:
        from kdcache.distill.losses import loss_defaults

        hps = {**loss_defaults(cfg.loss), **(cfg.hparams or {})}
    except ValueError:
        hps = dict(cfg.hparams or {})
    hp = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(hps.items())
    )
    loss = f"loss {cfg.loss}" + (f" ({hp})" if hp else "")
    who = f"{cfg.student} ← {' + '.join(teachers)}" if teachers else f"{cfg.student} (no teacher)"
    return f"{who} · {loss} · {cfg.dataset}/{cfg.split}"


def _panels(records: list[dict]) -> list[tuple[str, str, list[str], bool]]:
    """(file name, y label, keys, as percent) of every panel with data."""
    have = {k for r in records for k in r}
    acc = [k for k in ("train_acc", "test_acc", "teacher_train_acc") if k in have]
    acc += sorted(k for k in have if k.endswith("_acc") and k not in acc and k != "best_acc")
    total = [r.get("loss") for r in records]
    # a term equal to the total (plain CE) would hide under it: show the total only
    loss = [k for k in LOSS_TERMS if k in have and (k == "loss" or _col(records, k) != total)]
    loss += sorted(k for k in have if k.endswith("_loss") and k not in loss)
    panels = [
        ("loss", "loss (mean per sample)", loss, False),
        ("accuracy", "top-1 accuracy (%)", acc, True),
        ("lr", "learning rate", ["lr"] if "lr" in have else [], False),
        (
            "wsl",
            "WSL diagnostics",
            [k for k in ("weight_mean", "reg_fraction") if k in have],
            False,
        ),
        (
            "speed",
            "throughput (samples/s)",
            ["samples_per_s"] if "samples_per_s" in have else [],
            False,
        ),
    ]
    return [p for p in panels if p[2]]


def _col(records: list[dict], key: str) -> list:
    return [r.get(key) for r in records]


def _draw(ax, records: list[dict], ylabel: str, keys: list[str], percent: bool) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    epochs = [r["epoch"] + 1 for r in records]
    values = []
    for k in keys:
        ys = [r.get(k, math.nan) for r in records]
        ys = [y * 100 if percent and y == y else y for y in ys]
        values += [y for y in ys if y == y]
        ls = "--" if k.startswith("test") or k.startswith("teacher") else "-"
        label = LABELS.get(k, k)
        if percent and k == "test_acc" and any(y == y for y in ys):
            best = max(range(len(ys)), key=lambda i: ys[i] if ys[i] == ys[i] else -1.0)
            label += f" (best {ys[best]:.2f}% at epoch {epochs[best]})"
        ax.plot(epochs, ys, ls, marker="o", ms=3, lw=1.6, label=label)
    if not percent and values and min(values) > 0 and max(values) / min(values) > LOG_RATIO * 0.999:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ylabel += " — log scale"
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def write_plots(records: list[dict], out: Path, title: str = "") -> list[Path]:
    """report.png with every panel, and each panel as its own PNG; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(records)
    written = []
    shown = panels[:4]  # loss, accuracy, lr, then WSL diagnostics or throughput
    rows = math.ceil(len(shown) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    for ax, (_, ylabel, keys, pct) in zip(axes.flat, shown, strict=False):
        _draw(ax, records, ylabel, keys, pct)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    last = records[-1]
    sub = f"{len(records)} epochs, {last.get('step', '?')} steps"
    if "best_acc" in last:
        sub += f", best accuracy {last['best_acc'] * 100:.2f}%"
    fig.suptitle(f"{title}\n{sub}" if title else sub, fontsize=12)
    fig.tight_layout()
    written.append(out / "report.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for name, ylabel, keys, pct in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        _draw(ax, records, ylabel, keys, pct)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def compare_runs(runs: dict[str, Path], path: Path, title: str = "") -> Path:
    """One figure of test accuracy per epoch for several runs (e.g. the demo's students)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, run in runs.items():
        recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        key = "test_acc" if any("test_acc" in r for r in recs) else "train_acc"
        ax.plot([r["epoch"] + 1 for r in recs], [r.get(key, math.nan) * 100 for r in recs],
                marker="o", ms=3, lw=1.6, label=label)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
