"""Run-loop helpers of `distill.train`: option checks, in-RAM data on the device, and the
in-epoch progress bar + log rows (host syncs only at log points)."""

from __future__ import annotations

import logging
import time

import torch
from kdcache.distill.steplog import interval_row
from tqdm import tqdm

log = logging.getLogger(__name__)


def check_options(cfg) -> None:
    """Every option's range (`DistillConfig.validate`), refused before anything is built or
    written; TensorBoard must be installed when asked for."""
    cfg.validate()
    if cfg.tensorboard:
        from kdcache.distill.steplog import require_tensorboard

        require_tensorboard()


def place_on_device(r, device: torch.device, budget_fraction: float = 0.25) -> None:
    """In-RAM image datasets (uint8 `images`) move to the GPU once, so their views are
    replayed there in batches (crop-flip/identity/rrc-flip are tensor ops); skipped when they
    would take more than `budget_fraction` of the free GPU memory."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    for ds in (r.train, r.test):
        images = getattr(ds, "images", None)
        if not isinstance(images, torch.Tensor) or images.device == device:
            continue
        if images.nbytes > budget_fraction * free:
            log.info("%s: %d bytes of images stay in host RAM", ds.name, images.nbytes)
            continue
        ds.images = images.to(device)


class EpochBar:
    """A tqdm bar over one epoch's batches: counts and samples/s from the host every step,
    the running loss and the log row (`StepLog`) only at log points, where the loop has
    synced anyway. `reduce` sums metric dicts over torchrun ranks (every rank calls `log`)."""

    def __init__(self, main: bool, steplog, epoch: int, epochs: int, total: int, lr, reduce):
        self.bar = tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            leave=False,
            disable=not main,
            dynamic_ncols=True,
            position=1,
        )
        self.steplog, self.epoch, self.lr, self.reduce = steplog, epoch, lr, reduce
        self.prev: dict = {}
        self.loss: float | None = None
        self.t0 = time.perf_counter()

    def progress(self, batches: int, samples: int, sums: dict | None) -> None:
        self.bar.update(batches - self.bar.n)
        if sums is not None or batches % 16 == 0:
            post = {"img/s": f"{samples / max(time.perf_counter() - self.t0, 1e-9):.0f}"}
            if self.loss is not None:
                post["loss"] = f"{self.loss:.4f}"
            self.bar.set_postfix(post, refresh=sums is not None)

    def log(self, step: int, sums: dict) -> None:
        sums = dict(sums)
        seconds = sums.pop("seconds")
        sums = self.reduce(sums)
        sums["seconds"] = seconds
        row = interval_row(self.epoch, step, self.lr(step), sums, self.prev)
        self.prev = sums
        self.loss = sums.get("loss", 0.0) / max(sums.get("n", 0.0), 1.0)
        self.steplog.step(row)

    def close(self) -> None:
        self.bar.close()
