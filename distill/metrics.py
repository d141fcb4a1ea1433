"""Per-epoch metrics: JSONL (append-only, resumable), CSV, and PNG plots at the end."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PLOTS = (
    ("loss", ("loss", "ce", "kd", "soft", "test_loss")),
    ("accuracy", ("train_acc", "test_acc", "teacher_train_acc")),
    ("wsl", ("weight_mean", "reg_fraction")),
    ("speed", ("samples_per_s",)),
)


class MetricsLog:
    """metrics.jsonl is the source of truth; metrics.csv and plots are derived from it."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.out, self.enabled = Path(out), enabled
        self.records: list[dict] = []
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)

    @property
    def jsonl(self) -> Path:
        return self.out / "metrics.jsonl"

    def truncate(self, start_epoch: int) -> None:
        """On resume keep the epochs before `start_epoch` (a killed epoch is redone)."""
        if not self.enabled or not self.jsonl.exists():
            return
        lines = self.jsonl.read_text().splitlines()
        self.records = [r for r in map(json.loads, filter(None, lines)) if r["epoch"] < start_epoch]
        self._rewrite()

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        self._write_csv()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        self._write_csv()

    def _write_csv(self) -> None:
        fields = sorted({k for r in self.records for k in r})
        with (self.out / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(self.records)

    def finish(self, plots: bool = True) -> list[Path]:
        """Write one PNG per metric group that has data."""
        if not (self.enabled and plots and self.records):
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        epochs = [r["epoch"] for r in self.records]
        for name, keys in PLOTS:
            keys = [k for k in keys if any(k in r for r in self.records)]
            if not keys:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for k in keys:
                ax.plot(epochs, [r.get(k, float("nan")) for r in self.records], label=k)
            ax.set_xlabel("epoch")
            ax.set_title(name)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = self.out / f"{name}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
        return written
