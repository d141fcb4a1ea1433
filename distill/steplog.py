"""In-epoch logging: `steps.jsonl`/`steps.csv` every `--log-every` optimizer steps, and
TensorBoard scalars (`--tensorboard`, imported only when asked for)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)

_COUNTS = ("n", "n_teacher", "correct", "teacher_correct", "reg_count", "seconds")


def require_tensorboard():
    """SummaryWriter; a clear one-line error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KdcacheError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or the kdcache[tensorboard] extra)"
        ) from None
    return SummaryWriter


def open_tensorboard(out: Path):
    """A SummaryWriter under OUT/tb."""
    return require_tensorboard()(log_dir=str(Path(out) / "tb"))


def interval_row(epoch: int, step: int, lr: float, cur: dict, prev: dict) -> dict:
    """Means over the samples since the previous log point of this epoch."""
    d = {k: cur.get(k, 0.0) - prev.get(k, 0.0) for k in cur}
    n = max(d.get("n", 0.0), 1.0)
    row = {"epoch": epoch, "step": step, "lr": lr}
    row.update({k: v / n for k, v in sorted(d.items()) if k not in _COUNTS})
    row["train_acc"] = d.get("correct", 0.0) / n
    if d.get("n_teacher"):
        row["teacher_train_acc"] = d.get("teacher_correct", 0.0) / d["n_teacher"]
        if "reg_count" in d:
            row["reg_fraction"] = d["reg_count"] / d["n_teacher"]
    row["samples_per_s"] = d.get("n", 0.0) / max(d.get("seconds", 0.0), 1e-9)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


class StepLog:
    """Rank 0's per-interval rows (JSONL is the source of truth; CSV is appended alongside)
    and the TensorBoard writer. Disabled on other ranks."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.out, self.enabled = Path(out), enabled
        self.tb = open_tensorboard(self.out) if (enabled and tensorboard) else None
        self.fields: list[str] | None = None

    @property
    def jsonl(self) -> Path:
        return self.out / "steps.jsonl"

    def truncate(self, step: int) -> None:
        """On resume drop rows after the resumed step (they are redone)."""
        if not self.enabled or not self.jsonl.exists():
            return
        rows = [json.loads(x) for x in self.jsonl.read_text().splitlines() if x]
        rows = [r for r in rows if r["step"] <= step]
        self.jsonl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        (self.out / "steps.csv").unlink(missing_ok=True)
        for r in rows:
            self._csv(r)

    def step(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self._csv(row)
        self.scalars("train", row, row["step"])

    def _csv(self, row: dict) -> None:
        path = self.out / "steps.csv"
        new = not path.exists()
        if new or self.fields is None:
            self.fields = sorted(row)
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def scalars(self, group: str, rec: dict, step: int) -> None:
        """Every numeric entry of `rec` as `group/name` at global step `step`."""
        if self.tb is None:
            return
        for k, v in rec.items():
            if k not in ("epoch", "step") and isinstance(v, int | float):
                self.tb.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
