"""Stage 1: run the teacher once over every (sample, view) and store its raw logits.

A chunk of `chunk_samples` samples is the unit of work, of resume and of distribution:
batches never straddle chunks, ranks take `chunk % world_size == rank`, and a chunk is
written whole (arrays, checksum, done flag) so a killed run resumes bit-identically.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache.backends import backend_class, exists
from cache.errors import DiskFullError, KdcacheError
from models.runtime import (
    Runtime,
    barrier,
    broadcast_object,
    forward,
    init_runtime,
    shutdown,
    to_device,
    write_run_config,
)
from precompute.config import PrecomputeConfig
from precompute.setup import Setup, build_setup, resolve_out_path

log = logging.getLogger(__name__)


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


def _teacher_logits(setup: Setup, batches, device: torch.device, amp: bool) -> np.ndarray:
    """A chunk's logits. On a GPU they stay there until the chunk is done, so its forwards
    queue back to back (one host sync per chunk, not one per batch). AMP is bf16 autocast,
    the one AMP dtype of both stages; uint8 image batches are scaled to [0, 1] on the device
    and fed channels_last like the model."""
    outs = []
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for b in batches:
            b = to_device(b, device)
            if isinstance(b, torch.Tensor) and b.dim() == 4:
                if b.dtype == torch.uint8:
                    b = b.to(torch.float32).div_(255.0)
                if cuda:
                    b = b.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and cuda):
                outs.append(forward(setup.model, b).float())
        return torch.cat(outs).cpu().numpy()


def _open_writer(cfg: PrecomputeConfig, setup: Setup, rt: Runtime, path: str):
    """Rank 0 creates (or resumes) the store under its lock; other ranks join it."""
    from cache.store import create_cache

    hdf5 = setup.backend == "hdf5"
    kwargs = dict(
        labels=np.asarray(setup.dataset.labels)[setup.order],
        keys=[setup.dataset.keys[i] for i in setup.order],
        provenance=setup.provenance(cfg),
        backend=setup.backend,
        storage_options=cfg.storage_options or None,
        tokenizer=_tokenizer_files(setup),
    )
    if hdf5 and rt.distributed:
        # HDF5 has one writer per file: each rank writes a shard, rank 0 merges them.
        shard = f"{path}.rank{rt.rank}-of{rt.world_size}.h5"
        return create_cache(shard, setup.spec, overwrite=cfg.overwrite, lock=True, **kwargs)
    err = None
    writer = None
    if rt.is_main:
        try:
            writer = create_cache(
                path,
                setup.spec,
                overwrite=cfg.overwrite,
                lock=True,
                break_lock=cfg.break_lock,
                **kwargs,
            )
        except KdcacheError as e:
            err = str(e)
    err = broadcast_object(rt, err)
    if err:
        raise KdcacheError(err)
    barrier(rt)
    if writer is None:
        writer = create_cache(path, setup.spec, overwrite=False, lock=False, **kwargs)
    return writer


def _tokenizer_files(setup: Setup) -> dict | None:
    """A text teacher's tokenizer, stored inside the cache (self-contained when pulled)."""
    if setup.modality != "text":
        return None
    from models.factory import load_tokenizer
    from models.hf import tokenizer_files

    return tokenizer_files(load_tokenizer(setup.info))


def run(cfg: PrecomputeConfig) -> dict:
    """Run stage 1 end to end and return a summary (path, key, shape, bytes, seconds)."""
    rt = init_runtime(cfg.device)
    try:
        return _run(cfg, rt)
    finally:
        shutdown(rt)


def _run(cfg: PrecomputeConfig, rt: Runtime) -> dict:
    t0 = time.perf_counter()
    setup = build_setup(cfg, rt.device)
    path = resolve_out_path(cfg, setup)
    existed = exists(path, cfg.storage_options or None)
    writer = _open_writer(cfg, setup, rt, path)
    local = path.removeprefix("file://")
    conf = None if "://" in local or not rt.is_main else Path(f"{local}.config.yaml")
    if conf is not None:  # next to a local cache; a remote one keeps `command` in provenance
        write_run_config(conf, cfg.cli_options, "precompute")
    try:
        return _compute(cfg, rt, setup, path, writer, t0)
    except KdcacheError as e:
        writer.close()  # releases the lock: a rerun never finds a leftover one
        # a run that fails on bad input leaves nothing behind; a full disk keeps every chunk
        if rt.is_main and not existed and not isinstance(e, DiskFullError):
            backend_class(setup.backend).delete(path, cfg.storage_options or None)
            if conf is not None:
                conf.unlink(missing_ok=True)
        raise


def _compute(cfg: PrecomputeConfig, rt: Runtime, setup: Setup, path: str, writer, t0: float):
    todo = writer.todo_chunks(rt.rank, rt.world_size)
    spec = setup.spec
    n_todo = sum(writer.chunk_range(c)[1] - writer.chunk_range(c)[0] for c in todo)
    log.info("rank %d: %d chunks to compute (%d samples)", rt.rank, len(todo), n_todo)
    setup.model.to(rt.device).eval()
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if setup.modality == "image":
            setup.model.to(memory_format=torch.channels_last)
    if cfg.compile:  # the teacher's forward only; chunk-local batches keep shapes fixed
        setup.model = torch.compile(setup.model)
    with tqdm(
        total=n_todo * spec.num_augs,
        unit="view",
        disable=not rt.is_main,
        desc="precompute",
        dynamic_ncols=True,
    ) as bar:
        _loop(cfg, rt, setup, writer, todo, bar)
    barrier(rt)
    if setup.backend == "hdf5" and rt.distributed:
        writer.close()
        barrier(rt)
        if rt.is_main:
            from cache.store import merge_shards

            shards = [f"{path}.rank{r}-of{rt.world_size}.h5" for r in range(rt.world_size)]
            merge_shards(path, shards)
            for s in shards:
                Path(s).unlink(missing_ok=True)
    elif rt.is_main:
        writer.finalize()
    else:
        writer.close()
    barrier(rt)
    seconds = time.perf_counter() - t0
    return summarize(path, setup, seconds, n_todo, cfg.storage_options)


class _Deferred:
    """Future-like: the work runs in the caller's thread when its result is asked for."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class _Inline:
    """Executor stand-in for view preparation in the loop's own thread (see `_loop`)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> _Deferred:
        return _Deferred(fn, *args)


def _loop(cfg: PrecomputeConfig, rt: Runtime, setup: Setup, writer, todo: list[int], bar) -> None:
    """Streaming sources (and per-sample policies) go through the DataLoader (`_loop_loader`);
    in-RAM images with a batched policy take the in-thread path below.

    Teacher forward over the todo chunks. Finished chunks are written in a background
    thread (numpy + store I/O), so cache writes overlap the teacher's forward.

    Views for the next chunks are prepared in `workers` background threads (1 when 0) while
    the teacher runs on an accelerator. On CPU with `workers` 0 they are prepared in this
    thread, between forwards: the forward already keeps every intra-op thread busy, and torch
    ops in a second thread start a second OpenMP team, after which libgomp throttles its
    spin-waits (more managed threads than cores) and the forward itself runs ~10-15% slower
    for the whole run; preparing a chunk inline costs ~2% (bench/precompute.py)."""
    if not setup.batched:
        return _loop_loader(cfg, rt, setup, writer, todo, bar)
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
            logits = _teacher_logits(setup, batches, rt.device, cfg.amp)
            n = params.shape[0]
            logits = logits.reshape(n, spec.num_augs, -1)
            _check_finite(logits, writer.chunk_range(c)[0], setup)
            writes.append(io.submit(writer.write_chunk, c, logits, params))
            while len(writes) > 2:  # bounded write-behind; errors surface here
                writes.pop(0).result()
            bar.update(n * spec.num_augs)
        for w in writes:
            w.result()


def _loop_loader(cfg: PrecomputeConfig, rt: Runtime, setup: Setup, writer, todo, bar) -> None:
    """Worker processes decode each sample once and cut its A views; a chunk's batches feed
    the teacher back to back, then the chunk is written behind the next one's forwards."""
    from data.loader import chunk_batches, clean_errors, precompute_loader

    spec = setup.spec
    a = spec.num_augs
    ranges = [writer.chunk_range(c) for c in todo]
    per_batch = max(1, cfg.batch_size // a)
    loader = precompute_loader(
        setup.maker,
        setup.order,
        spec.views["seed"],
        a,
        spec.views["identity_view"],
        chunk_batches(ranges, per_batch),
        workers=cfg.workers,
        pin=rt.device.type == "cuda",
    )
    it = clean_errors(loader)
    with ThreadPoolExecutor(1) as io:
        writes = []
        for c, (start, stop) in zip(todo, ranges, strict=True):
            params: list[np.ndarray] = []

            def views(n=stop - start, params=params):
                got = 0
                while got < n:
                    b = next(it)
                    params.append(b["params"])
                    got += len(b["rows"])
                    yield b["views"]

            logits = _teacher_logits(setup, views(), rt.device, cfg.amp)
            p = np.concatenate(params).reshape(stop - start, a, -1)
            logits = logits.reshape(stop - start, a, -1)
            _check_finite(logits, start, setup)
            writes.append(io.submit(writer.write_chunk, c, logits, p))
            while len(writes) > 2:  # bounded write-behind; errors surface here
                writes.pop(0).result()
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


def summarize(path: str, setup: Setup, seconds: float, computed: int, storage_options) -> dict:
    """The final one-screen summary of a run."""
    from cache.tools import info

    d = info(path, storage_options=storage_options or None)
    spec = setup.spec
    views = computed * spec.num_augs
    out = {
        "path": path,
        "key": spec.key(),
        "shape": [spec.n, spec.num_augs, spec.num_classes],
        "bytes": d.get("size_bytes"),
        "complete": d.get("complete"),
        "seconds": round(seconds, 2),
        "computed_samples": computed,
        "views_per_s": round(views / max(seconds, 1e-9), 1),
    }
    log.info("precompute summary %s", out)
    return out


def format_summary(s: dict) -> str:
    """Human-readable summary line block for the CLI."""
    n, a, c = s["shape"]
    return (
        f"cache     {s['path']}\n"
        f"key       {s['key']}\n"
        f"shape     {n} samples x {a} views x {c} classes\n"
        f"bytes     {s['bytes']}\n"
        f"complete  {s['complete']}\n"
        f"time      {s['seconds']} s for {s['computed_samples']} samples "
        f"({s['views_per_s']} views/s)"
    )
