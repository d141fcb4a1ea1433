"""One epoch of stage 2: plan (sample, view) batches, replay the views, step the student.

The global batch order depends only on (seed, epoch), never on the world size: each torchrun
rank takes every world_size-th row of a global batch, so DDP sees the same samples per step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch

from data.datasets import raw_batch
from models.runtime import forward, to_device


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=(int(seed) << 32) + int(epoch) + 1))


def plan_epoch(
    n: int, num_augs: int, batch_size: int, seed: int, epoch: int, views: str, world_size: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Global (samples, augs) batches: one seeded view per sample, or every cached view."""
    from cache.reader import choose_augs

    rng = _rng(seed, epoch)
    if views == "all":
        pairs = rng.permutation(n * num_augs)
        samples, augs = pairs // num_augs, pairs % num_augs
    else:
        samples = rng.permutation(n)
        augs = choose_augs(seed, epoch, samples, num_augs) if num_augs > 1 else samples * 0
    for lo in range(0, len(samples), batch_size):
        s, a = samples[lo : lo + batch_size], augs[lo : lo + batch_size]
        if len(s) >= world_size:  # every rank must get a row, or DDP would hang
            yield s.astype(np.int64), a.astype(np.int64)


class BatchMaker:
    """Turns planned (samples, augs) into replayed views, labels and teacher logits."""

    def __init__(
        self, dataset, policy, teacher=None, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.dataset, self.policy, self.teacher = dataset, policy, teacher
        self.seed, self.rank, self.world = seed, rank, world_size
        self.labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))
        self.cached = teacher is not None and hasattr(teacher, "params")

    def __call__(
        self, samples: np.ndarray, augs: np.ndarray, epoch: int, t_logits: np.ndarray | None = None
    ) -> dict:
        from data.views import view_params_for

        sl = slice(self.rank, None, self.world)
        samples, augs = samples[sl], augs[sl]
        if self.cached:
            params = self.teacher.params(samples, augs)
        else:  # no cache: fresh seeded params per (seed, epoch, sample)
            params = view_params_for(self.policy, self.seed * 100_003 + epoch, samples, 1, False)[
                :, 0
            ]
        views = self.policy.apply(raw_batch(self.dataset, samples), torch.from_numpy(params))
        t = None
        if t_logits is not None:
            t = torch.from_numpy(np.ascontiguousarray(t_logits[sl]))
        elif self.cached and not self.teacher.needs_views and self.teacher.chunked is None:
            t = self.teacher.logits(samples, augs)
        return {
            "samples": samples,
            "augs": augs,
            "views": views,
            "labels": self.labels[torch.from_numpy(samples)],
            "teacher": t,
        }


def prefetch_depth(device: torch.device, workers: int = 0) -> int:
    """Batches made ahead in a background thread (0: made in the training thread).

    On CPU with `workers` 0 a batch is made in the training thread: the step already keeps
    every intra-op thread busy, and torch ops (view replay) in a second thread start a second
    OpenMP team, after which libgomp throttles its spin-waits (more managed threads than
    cores) and every step runs ~10-20% slower, while making a batch of 64 costs ~1-2 ms.
    On a GPU, or with `workers` > 0 (e.g. for a cache read chunk by chunk from remote
    storage), batches are made ahead.
    """
    if device.type == "cpu" and workers <= 0:
        return 0
    return max(2, workers)


def prefetch(it, depth: int):
    """Run a batch iterator in a background thread so view replay overlaps training."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in it:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def epoch_batches(
    make: BatchMaker, n: int, batch_size: int, seed: int, epoch: int, views: str, depth: int
):
    """All batches of one epoch, from the RAM plan or the chunk-aware cache iterator."""
    t = make.teacher
    if t is not None and getattr(t, "chunked", None) is not None:
        from cache.reader import iter_epoch

        mode = "all" if views == "all" else "random"
        it = (
            make(s, a, epoch, lg)
            for s, a, lg in iter_epoch(
                t.chunked, batch_size=batch_size, seed=seed, epoch=epoch, aug_mode=mode
            )
            if len(s) >= make.world  # every rank must get a row, or DDP would hang
        )
    else:
        num_augs = t.num_augs if make.cached else 1
        it = (
            make(s, a, epoch)
            for s, a in plan_epoch(n, num_augs, batch_size, seed, epoch, views, make.world)
        )
    return prefetch(it, depth)


def train_epoch(
    model,
    ddp_model,
    batches,
    loss_fn,
    optimizer,
    device,
    *,
    teacher=None,
    amp: bool = False,
    reg_fn=None,
    on_step=None,
    max_steps: int | None = None,
    step: int = 0,
    history: list | None = None,
) -> tuple[dict, int]:
    """Train over `batches`; returns summed metrics (divide by 'n') and the new step count.

    `history`, when given, receives every step's loss terms (used by tests and benches).
    """
    model.train()
    sums: dict = defaultdict(float)
    t0 = time.perf_counter()
    use_amp = amp and device.type == "cuda"
    for b in batches:
        if max_steps is not None and step >= max_steps:
            break
        x = to_device(b["views"], device)
        y = b["labels"].to(device, non_blocking=True)
        t = b["teacher"]
        if teacher is not None and teacher.needs_views:
            t = teacher.logits(b["samples"], b["augs"], x)
        t = None if t is None else t.to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            s = forward(ddp_model, x)
        out = loss_fn(s.float(), t, y)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        step += 1
        if history is not None:
            history.append({k: float(v.detach()) for k, v in out.items()})
        if on_step is not None:
            on_step(step)
        n = len(y)
        sums["n"] += n
        for k, v in out.items():
            sums[k] += float(v.detach()) * n
        sums["correct"] += float((s.detach().argmax(1) == y).sum())
        if t is not None:
            sums["teacher_correct"] += float((t.argmax(1) == y).sum())
            sums["n_teacher"] += n
            if reg_fn is not None:
                r = reg_fn(s.detach().float(), t, y)
                sums["reg_count"] += float(r["count"])
    sums["seconds"] = time.perf_counter() - t0
    return dict(sums), step


@torch.no_grad()
def evaluate_model(
    model, dataset, policy, device, batch_size: int = 256, rank: int = 0, world_size: int = 1
) -> dict:
    """Top-1 accuracy and CE on the eval (identity) view of every sample of `dataset`."""
    model.eval()
    n = len(dataset)
    idx = np.arange(rank, n, world_size, dtype=np.int64)
    correct, loss = 0.0, 0.0
    ident = torch.from_numpy(np.asarray(policy.identity_params(), dtype=np.float32))
    labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))
    for lo in range(0, len(idx), batch_size):
        s = idx[lo : lo + batch_size]
        params = ident.expand(len(s), -1)
        x = to_device(policy.apply(raw_batch(dataset, s), params), device)
        y = labels[torch.from_numpy(s)].to(device)
        out = forward(model, x).float()
        correct += float((out.argmax(1) == y).sum())
        loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
    return {"correct": correct, "loss_sum": loss, "n": float(len(idx))}
