"""Stage 1's chunk loop: view batches of a chunk (in this thread or by DataLoader worker
processes), the teacher's forward over them, and write-behind of finished chunks.

`run_chunks` is what `precompute.run` calls (bench/precompute.py wraps it and
`teacher_logits` to time the loop's cycles).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.models.malloc import maybe_trim
from kdcache.models.runtime import Runtime, forward, to_device
from kdcache.precompute.config import PrecomputeConfig
from kdcache.precompute.setup import Setup


def prepare_chunk(setup: Setup, start: int, stop: int, batch_size: int, pin: bool = False):
    """Raw samples + their seeded view params, cut into fixed chunk-local view batches
    (page-locked with `pin`, so their copies to a GPU are asynchronous)."""
    samples = np.arange(start, stop, dtype=np.int64)
    params = setup.view_params(samples)  # (n, A, P)
    n, a, p = params.shape
    raw = setup.dataset.get(samples)
    flat_params = torch.from_numpy(params.reshape(n * a, p))
    rows = np.repeat(np.arange(n), a)
    batches = []
    for lo in range(0, n * a, batch_size):
        hi = min(lo + batch_size, n * a)
        idx = torch.from_numpy(rows[lo:hi])
        view = setup.policy.apply(raw[idx], flat_params[lo:hi])
        batches.append(_pinned(view) if pin else view)
    return params, batches


def _pinned(batch):
    if isinstance(batch, dict):
        return {k: v.pin_memory() for k, v in batch.items()}
    return batch.pin_memory()


FORWARD_BLOCK = 64
"""Views per teacher forward, whatever --batch-size is: a constant of the cache format (so
not in the key). Kernels pick their algorithm (blocking, accumulation order) by batch shape,
so a view's logits could depend on how many views shared its forward; with every forward
one shape, and blocks aligned to the chunk's first view (the last one zero-padded), a view's
bytes depend only on the chunk, never on the batch size, the workers or the resume point."""


def forward_blocks(batches, block: int = FORWARD_BLOCK):
    """Re-cut a chunk's view batches into (block, n_real) pairs of exactly `block` rows (the
    last zero-padded). Token dicts pass through as they come (their padded length follows the
    batch anyway)."""
    buf: list[torch.Tensor] = []
    have = 0
    for b in batches:
        if isinstance(b, dict):
            yield b, len(b["input_ids"])
            continue
        buf.append(b)
        have += len(b)
        if have < block:
            continue
        flat = torch.cat(buf) if len(buf) > 1 else buf[0]
        full = have - have % block
        for lo in range(0, full, block):
            yield flat[lo : lo + block], block
        buf, have = ([flat[full:]], have - full) if full < have else ([], 0)
    if have:
        rest = torch.cat(buf) if len(buf) > 1 else buf[0]
        pad = rest.new_zeros((block - have, *rest.shape[1:]))
        yield torch.cat([rest, pad]), have


def teacher_logits(setup: Setup, batches, device: torch.device, amp: bool) -> np.ndarray:
    """A chunk's logits, computed on fixed-shape blocks (`FORWARD_BLOCK`). On a GPU they stay
    there until the chunk is done, so its forwards queue back to back (one host sync per
    chunk, not one per batch). AMP is bf16 autocast, the one AMP dtype of both stages; uint8
    image batches are scaled to [0, 1] on the device and fed channels_last like the model."""
    outs = []
    cuda = device.type == "cuda"
    moved = (to_device(b, device) for b in batches)
    with torch.inference_mode():
        for b, n in forward_blocks(moved):
            if isinstance(b, torch.Tensor) and b.dim() == 4:
                if b.dtype == torch.uint8:
                    b = b.to(torch.float32).div_(255.0)
                if cuda:
                    b = b.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and cuda):
                outs.append(forward(setup.model, b)[:n].float())
        return torch.cat(outs).cpu().numpy()


class _Deferred:
    """Future-like: the work runs in the caller's thread when its result is asked for."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class _Inline:
    """Executor stand-in for view preparation in the loop's own thread (see `run_chunks`)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> _Deferred:
        return _Deferred(fn, *args)


def run_chunks(
    cfg: PrecomputeConfig, rt: Runtime, setup: Setup, writer, todo: list[int], bar
) -> None:
    """Streaming sources (and per-sample policies) go through the DataLoader
    (`_loader_chunks`); in-RAM images with a batched policy take the in-thread path below.

    Teacher forward over the todo chunks. Finished chunks are written in a background
    thread (numpy + store I/O), so cache writes overlap the teacher's forward.

    Views for the next chunks are prepared in `workers` background threads (1 when 0) while
    the teacher runs on an accelerator. On CPU with `workers` 0 they are prepared in this
    thread, between forwards: the forward already keeps every intra-op thread busy, and torch
    ops in a second thread start a second OpenMP team, after which libgomp throttles its
    spin-waits (more managed threads than cores) and the forward itself runs ~10-15% slower
    for the whole run; preparing a chunk inline costs ~2% (bench/precompute.py)."""
    if not setup.batched:
        return _loader_chunks(cfg, rt, setup, writer, todo, bar)
    spec = setup.spec
    inline = rt.device.type == "cpu" and cfg.workers == 0
    workers = max(1, cfg.workers)
    batch_size = max(1, min(cfg.batch_size, spec.chunk_samples * spec.num_augs))
    pin = rt.device.type == "cuda"
    pool = _Inline() if inline else ThreadPoolExecutor(workers)
    with pool as prep, ThreadPoolExecutor(1) as io:
        pending = [
            prep.submit(prepare_chunk, setup, *writer.chunk_range(c), batch_size, pin)
            for c in todo[: workers + 1]
        ]
        writes = []
        for j, c in enumerate(todo):
            params, batches = pending[j].result()
            if j + workers + 1 < len(todo):
                nxt = todo[j + workers + 1]
                pending.append(
                    prep.submit(prepare_chunk, setup, *writer.chunk_range(nxt), batch_size, pin)
                )
            pending[j] = None
            logits = teacher_logits(setup, batches, rt.device, cfg.amp)
            n = params.shape[0]
            logits = logits.reshape(n, spec.num_augs, -1)
            _check_finite(logits, writer.chunk_range(c)[0], setup)
            writes.append(io.submit(writer.write_chunk, c, logits, params))
            while len(writes) > 2:  # bounded write-behind; errors surface here
                writes.pop(0).result()
            maybe_trim()  # freed heap pages back to the OS (models/malloc.py)
            bar.update(n * spec.num_augs)
        for w in writes:
            w.result()


def chunk_loader(setup: Setup, cfg: PrecomputeConfig, ranges, pin: bool = False):
    """Per chunk range, a generator of its loader batches (dicts with rows, views, params) made
    by DataLoader worker processes, each sample decoded once for its A views; batches never
    straddle chunks. Consume each chunk's batches before asking for the next chunk."""
    from kdcache.data.loader import chunk_batches, clean_errors, mix_align, precompute_loader

    a = setup.spec.num_augs
    batches = chunk_batches(ranges, max(1, cfg.batch_size // a), mix_align(setup.policy))
    loader = precompute_loader(
        setup.maker, setup.order, setup.spec.views["seed"], a, setup.spec.views["identity_view"],
        batches, workers=cfg.workers, pin=pin,
    )  # fmt: skip
    it = clean_errors(loader)

    def one(n: int):
        got = 0
        while got < n:
            b = next(it)
            got += len(b["rows"])
            yield b

    for start, stop in ranges:
        yield one(stop - start)


def _loader_chunks(cfg: PrecomputeConfig, rt: Runtime, setup: Setup, writer, todo, bar) -> None:
    """Worker processes decode each sample once and cut its A views; a chunk's batches feed
    the teacher back to back, then the chunk is written behind the next one's forwards."""
    a = setup.spec.num_augs
    ranges = [writer.chunk_range(c) for c in todo]
    chunks = chunk_loader(setup, cfg, ranges, pin=rt.device.type == "cuda")
    with ThreadPoolExecutor(1) as io:
        writes = []
        for c, (start, stop), batches in zip(todo, ranges, chunks, strict=True):
            params: list[np.ndarray] = []

            def views(batches=batches, params=params):
                for b in batches:
                    params.append(b["params"])
                    yield b["views"]

            logits = teacher_logits(setup, views(), rt.device, cfg.amp)
            p = np.concatenate(params).reshape(stop - start, a, -1)
            logits = logits.reshape(stop - start, a, -1)
            _check_finite(logits, start, setup)
            writes.append(io.submit(writer.write_chunk, c, logits, p))
            while len(writes) > 2:  # bounded write-behind; errors surface here
                writes.pop(0).result()
            maybe_trim()  # freed heap pages back to the OS (models/malloc.py)
            bar.update((stop - start) * a)
        for w in writes:
            w.result()


def _check_finite(logits: np.ndarray, start: int, setup: Setup) -> None:
    bad = ~np.isfinite(logits).all(axis=(1, 2))
    if bad.any():
        idx = (np.flatnonzero(bad) + start)[:5].tolist()
        keys = [setup.dataset.keys[setup.order[i]] for i in idx]
        raise KdcacheError(
            f"teacher produced NaN/Inf logits for samples {idx} ({', '.join(keys)}); "
            "refusing to cache them"
        )
