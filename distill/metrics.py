"""Per-epoch metrics: JSONL (append-only, resumable), CSV, and PNG plots at the end
(`distill/plots.py`)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


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

    def finish(self, plots: bool = True, title: str = "") -> list[Path]:
        """Write the run's report figure (report.png) and one PNG per panel."""
        if not (self.enabled and plots and self.records):
            return []
        from kdcache.distill.plots import write_plots

        return write_plots(self.records, self.out, title)
