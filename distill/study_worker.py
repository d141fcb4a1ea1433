"""One run of a study, in its own process: `python -m kdcache.distill.study_worker RUN_DIR THREADS`.

Reads RUN_DIR/run.json (a DistillConfig), trains (resuming from RUN_DIR/train/last.pt when a
previous attempt was killed), and writes RUN_DIR/result.json last and atomically: a run with
a result file is finished, whatever else is in its folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path


def result_of(record: dict, seconds: float) -> dict:
    """What the study keeps of a run: the final epoch's numbers (never the best epoch's, which
    would select on the test set)."""
    keep = ("epoch", "test_acc", "best_acc", "train_acc", "loss", "test_loss", "test_ppl",
            "best_ppl", "train_ppl", "ce", "kd", "tokens")  # fmt: skip
    out = {k: record[k] for k in keep if k in record}
    out["wall_s"] = round(seconds, 3)
    return out


def main(run_dir: str, threads: int) -> int:
    import torch
    from kdcache.cache.errors import KdcacheError
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.train import run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(threads)
    d = Path(run_dir)
    cfg = json.loads((d / "run.json").read_text())
    cfg["resume"] = (Path(cfg["out"]) / "last.pt").exists()
    t0 = time.perf_counter()
    try:
        record = run(DistillConfig(**cfg))
    except KdcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not record:  # killed after its last checkpoint: the record is in metrics.jsonl
        lines = (Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines()
        record = json.loads(lines[-1])
    tmp = d / f"result.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result_of(record, time.perf_counter() - t0), sort_keys=True))
    os.replace(tmp, d / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
