"""How stage 2 feeds the device: background batch making, pinned copies, uint8 inputs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from kdcache.models.runtime import to_device


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


def prefetch(it, depth: int) -> Iterator:
    """Run a batch iterator in a background thread so view replay overlaps training. The
    thread starts now (not at the first `next`), so an epoch's batches are made while the
    previous epoch is still being evaluated."""
    if depth <= 0:
        return iter(it)
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

    def consume():
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    return consume()


def pin_batch(b: dict) -> dict:
    """Page-lock a batch's host tensors (in the prefetch thread) so the copies to the GPU in
    the training thread are asynchronous; tensors already on a device are left alone."""

    def pin(v):
        if isinstance(v, dict):
            return {k: pin(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            return v.pin_memory()
        return v

    return {k: pin(v) for k, v in b.items()}


def to_input(views, device: torch.device, channels_last: bool = False):
    """A view batch as the model's input on `device`: uint8 images (streamed loaders) are
    copied as uint8 and scaled to float [0, 1] there (bit-identical to `data.views.to_float`);
    channels_last when the model is."""
    if isinstance(views, dict):
        return to_device(views, device)
    x = views.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
