"""Run figures a person can put in a report: titled, labelled, integer epochs, log scale where
terms differ by orders of magnitude, a learning-rate panel."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from kdcache.distill.config import DistillConfig  # noqa: E402
from kdcache.distill.plots import _draw, _panels, compare_runs, run_title, write_plots  # noqa: E402
from PIL import Image  # noqa: E402


def _records(n: int = 7) -> list[dict]:
    """A WSL-like run: total loss ~30 next to a CE term ~0.5; a step lr schedule."""
    return [
        {
            "epoch": e,
            "step": 10 * (e + 1),
            "lr": 0.05 * (0.1 if e >= 4 else 1.0),
            "loss": 30.0 - e,
            "ce": 0.5 - 0.02 * e,
            "soft": 12.0 - 0.5 * e,
            "test_loss": 0.7 - 0.03 * e,
            "train_acc": 0.5 + 0.05 * e,
            "test_acc": 0.4 + 0.04 * e,
            "best_acc": 0.4 + 0.04 * e,
            "weight_mean": 0.6,
            "reg_fraction": 0.3,
            "samples_per_s": 500.0,
        }
        for e in range(n)
    ]


def test_panels_are_labelled_integer_epochs_and_log_where_needed():
    recs = _records()
    names = [p[0] for p in _panels(recs)]
    assert names == ["loss", "accuracy", "lr", "wsl", "speed"]
    axes = {}
    for name, ylabel, keys, pct in _panels(recs):
        fig, ax = plt.subplots()
        _draw(ax, recs, ylabel, keys, pct)
        fig.canvas.draw()
        axes[name] = ax
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel()
        ticks = [t for t in ax.get_xticks() if 1 <= t <= len(recs)]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert min(line.get_xdata()[0] for line in ax.get_lines()) == 1  # epoch 1 = first
    assert axes["loss"].get_yscale() == "log" and "log scale" in axes["loss"].get_ylabel()
    assert axes["lr"].get_yscale() == "log"  # 0.05 -> 0.005 -> ... (step schedule)
    assert axes["accuracy"].get_yscale() == "linear" and "%" in axes["accuracy"].get_ylabel()
    labels = [t.get_text() for t in axes["accuracy"].get_legend().get_texts()]
    assert any("best 64.00% at epoch 7" in t for t in labels), labels
    assert max(axes["accuracy"].get_lines()[1].get_ydata()) == 64.0
    plt.close("all")
    flat = [{**r, "loss": 0.5, "ce": 0.45, "soft": 0.4, "test_loss": 0.6} for r in recs]
    fig, ax = plt.subplots()
    _draw(ax, flat, "loss", ["loss", "ce", "soft", "test_loss"], False)
    assert ax.get_yscale() == "linear"
    plt.close(fig)


def test_write_plots_report_and_title(tmp_path):
    cfg = DistillConfig(student="resnet8", loss="kd", hparams={"T": 4.0})
    title = run_title(cfg, ["resnet32x4"])
    assert title.startswith("resnet8 ← resnet32x4 · loss kd (")
    assert "T=4" in title and "alpha=" in title and "digits/train" in title
    assert "(no teacher)" in run_title(DistillConfig(student="resnet8"), [])
    paths = write_plots(_records(), tmp_path, title)
    assert [p.name for p in paths] == [
        "report.png", "loss.png", "accuracy.png", "lr.png", "wsl.png", "speed.png",
    ]  # fmt: skip
    w, h = Image.open(tmp_path / "report.png").size
    assert w >= 1200 and h >= 800  # was 400x256
    one = write_plots(_records(1), tmp_path / "x", "") if (tmp_path / "x").mkdir() is None else []
    assert (tmp_path / "x" / "report.png").exists() and len(one) == 6
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(f'{{"epoch": {e}, "test_acc": 0.5}}\n' for e in range(3))
    )
    assert compare_runs({"kd": run}, tmp_path / "c.png", "students").exists()
