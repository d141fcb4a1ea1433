"""Stage 1: run the teacher once over every (sample, view) and store its raw logits.

A chunk of `chunk_samples` samples is the unit of work, of resume and of distribution:
batches never straddle chunks, ranks take `chunk % world_size == rank`, and a chunk is
written whole (arrays, checksum, done flag) so a killed run resumes bit-identically.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from kdcache.cache.backends import backend_class, exists
from kdcache.cache.errors import DiskFullError, KdcacheError
from kdcache.models.runtime import (
    Runtime,
    barrier,
    deterministic_kernels,
    init_runtime,
    main_then_others,
    shutdown,
    write_run_config,
)
from kdcache.precompute import loop as chunk_loop
from kdcache.precompute.config import PrecomputeConfig, parse_shard
from kdcache.precompute.setup import Setup, build_setup, resolve_out_path
from tqdm import tqdm

log = logging.getLogger(__name__)


def _open_writer(cfg: PrecomputeConfig, setup: Setup, rt: Runtime, path: str):
    """Rank 0 creates (or resumes) the store under its lock; other ranks join it."""
    from kdcache.cache.store import create_cache

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
    return main_then_others(
        rt,
        lambda: create_cache(path, setup.spec, overwrite=cfg.overwrite, lock=True,
                             break_lock=cfg.break_lock, **kwargs),
        lambda: create_cache(path, setup.spec, overwrite=False, lock=False, **kwargs),
    )  # fmt: skip


def _tokenizer_files(setup: Setup) -> dict | None:
    """A text teacher's tokenizer, stored inside the cache (self-contained when pulled)."""
    if setup.modality != "text":
        return None
    from kdcache.models.factory import load_tokenizer
    from kdcache.models.hf import tokenizer_files

    return tokenizer_files(load_tokenizer(setup.info))


def run(cfg: PrecomputeConfig) -> dict:
    """Run stage 1 end to end and return a summary (path, key, shape, bytes, seconds)."""
    from kdcache.models.lm import is_causal_lm

    if cfg.token_cache or cfg.top_p is not None or is_causal_lm(cfg.teacher):
        if not is_causal_lm(cfg.teacher):
            raise KdcacheError(
                f"teacher {cfg.teacher!r} is not a causal language model; a token cache "
                "(--token-cache, --top-p) needs an hf: AutoModelForCausalLM teacher"
            )
        from kdcache.precompute.lm import run_lm

        return run_lm(cfg)
    rt = init_runtime(cfg.device)
    try:
        return _run(cfg, rt)
    finally:
        shutdown(rt)


def _check_shard(cfg: PrecomputeConfig, setup: Setup, rt: Runtime) -> None:
    """--shard I/N must own a chunk; HDF5 under torchrun merges complete rank files only."""
    index, count = parse_shard(cfg.shard)
    if index >= setup.spec.n_chunks:
        raise KdcacheError(
            f"--shard {cfg.shard}: the cache has {setup.spec.n_chunks} chunks, so shard {index} "
            f"would have none; expected N <= {setup.spec.n_chunks} (or smaller --chunk-samples)"
        )
    if count > 1 and setup.backend == "hdf5" and rt.distributed:
        raise KdcacheError(
            f"--shard {cfg.shard} under torchrun needs a zarr --out (HDF5 ranks write files "
            "that are merged only when complete); use .zarr, then `cache convert` to .h5"
        )


def shard_chunks(todo: list[int], shard: str | None, rank: int, world_size: int) -> list[int]:
    """The chunks this process computes: those of its shard (c % N == I), dealt to the
    torchrun ranks in turn ((c // N) % world_size == rank; without a shard c % world_size)."""
    index, count = parse_shard(shard)
    return [c for c in todo if c % count == index and (c // count) % world_size == rank]


def _run(cfg: PrecomputeConfig, rt: Runtime) -> dict:
    t0 = time.perf_counter()
    setup = build_setup(cfg, rt.device)
    _check_shard(cfg, setup, rt)
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
    todo = shard_chunks(writer.todo_chunks(), cfg.shard, rt.rank, rt.world_size)
    spec = setup.spec
    n_todo = sum(writer.chunk_range(c)[1] - writer.chunk_range(c)[0] for c in todo)
    log.info("rank %d: %d chunks to compute (%d samples)", rt.rank, len(todo), n_todo)
    setup.model.to(rt.device).eval()
    deterministic_kernels(rt.device)
    if rt.device.type == "cuda":
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
        chunk_loop.run_chunks(cfg, rt, setup, writer, todo, bar)
    barrier(rt)
    if setup.backend == "hdf5" and rt.distributed:
        writer.close()
        barrier(rt)
        if rt.is_main:
            from kdcache.cache.store import merge_shards

            shards = [f"{path}.rank{r}-of{rt.world_size}.h5" for r in range(rt.world_size)]
            merge_shards(path, shards)
            for s in shards:
                Path(s).unlink(missing_ok=True)
    elif rt.is_main and not writer.missing_chunks():
        writer.finalize()
    else:  # other ranks; or a shard whose other chunks are someone else's (a partial cache)
        writer.close()
    barrier(rt)
    if not rt.is_main:
        return {}  # rank 0 reports (and the CLI prints) the summary once
    seconds = time.perf_counter() - t0
    out = summarize(path, setup, seconds, n_todo, cfg.storage_options)
    if cfg.shard is not None:
        out["shard"] = cfg.shard
    return out


def summarize(path: str, setup: Setup, seconds: float, computed: int, storage_options) -> dict:
    """The final one-screen summary of a run."""
    from kdcache.cache.tools import info

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
    if s.get("kind") == "tokens":
        kl = s.get("kl_sample")
        return (
            f"cache     {s['path']}\nkey       {s['key']}\n"
            f"tokens    {s['tokens']} in {s['samples']} samples\nbytes     {s['bytes']}\n"
            f"complete  {s['complete']}\n"
            f"time      {s['seconds']} s ({s['tokens_per_s']} tokens/s)"
            + (
                f"\nKL        {kl['mean_kl']:.4g} ({kl['direction']}, {kl['tokens']} tokens)"
                if kl
                else ""
            )
        )
    n, a, c = s["shape"]
    shard = ""
    if s.get("shard") and not s["complete"]:
        index, count = parse_shard(s["shard"])
        shard = (
            f"\nshard     {s['shard']}: chunks c % {count} == {index} done; join the shards with "
            "`kdcache cache merge OUT SHARD...`"
        )
    return (
        f"cache     {s['path']}\n"
        f"key       {s['key']}\n"
        f"shape     {n} samples x {a} views x {c} classes\n"
        f"bytes     {s['bytes']}\n"
        f"complete  {s['complete']}\n"
        f"time      {s['seconds']} s for {s['computed_samples']} samples "
        f"({s['views_per_s']} views/s)" + shard
    )
