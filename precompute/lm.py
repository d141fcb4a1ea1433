"""Stage 1 for causal-LM teachers: a token-level cache (top-k log-probs + tail, or sampled ids).

The corpus is tokenized first (one streaming pass: lengths, keys and the fingerprint are then
known, so the cache's offsets are fixed up front). A sample-chunk is the unit of work, resume
and distribution (torchrun ranks take c % world_size == rank). Batches are padded to their
longest sample; targets are selected on the device from fp32 log-softmax; sampled draws are
seeded by (seed, row, t) only.
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import torch
from kdcache.cache.dtypes import encode
from kdcache.cache.errors import KdcacheError
from kdcache.cache.tokenstore import id_packing, pack_ids, pick_token_chunk, token_spec
from kdcache.models.runtime import (
    barrier,
    init_runtime,
    main_then_others,
    shutdown,
)
from kdcache.precompute.config import PrecomputeConfig
from kdcache.precompute.targets import (
    distinct_counts,
    draw_uniforms,
    kl_to_dense,
    sampled_targets,
    topk_targets,
)
from tqdm import tqdm

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 1024


def _mode(cfg: PrecomputeConfig) -> tuple[str, int]:
    if cfg.topk is not None and cfg.sampled is not None:
        raise KdcacheError("--topk and --sampled are exclusive; pick one")
    if cfg.topk is None and cfg.sampled is None:
        raise KdcacheError(
            "a causal-LM teacher writes a token cache: pass --topk K (e.g. 64) or --sampled K "
            "(a dense per-token cache of the whole vocabulary is not stored)"
        )
    mode, k = ("topk", cfg.topk) if cfg.topk is not None else ("sampled", cfg.sampled)
    if k < 1:
        raise KdcacheError(f"--{mode} {k}; expected an integer >= 1")
    return mode, int(k)


def _max_length(cfg: PrecomputeConfig, info: dict) -> int:
    limit = info.get("max_positions")
    ml = cfg.max_length if cfg.max_length is not None else min(DEFAULT_MAX_LENGTH, limit or 10**9)
    if ml < 1:
        raise KdcacheError(f"--max-length {ml}; expected an integer >= 1")
    if limit is not None and ml > limit:
        raise KdcacheError(
            f"--max-length {ml} is beyond the teacher's {limit} positions; expected <= {limit}"
        )
    return int(ml)


def _out_path(cfg: PrecomputeConfig, key: str, backend: str) -> str:
    out = cfg.out.rstrip("/")
    if out.lower().endswith((".zarr", ".h5", ".hdf5")):
        return out
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.teacher).strip("_.")[:60]
    ext = ".zarr" if backend == "zarr" else ".h5"
    ds = cfg.dataset.replace(":", "_").replace("/", "_")
    return f"{out}/{ds}-{cfg.split}/{slug}-tok-{key[:12]}{ext}"


def build(cfg: PrecomputeConfig):
    """(model, tokenizer files, spec, corpus, info) of a token-cache run; bad input raises
    before anything is written."""
    from kdcache.data.lmtext import iter_rows, tokenize_corpus
    from kdcache.models.hf import tokenizer_files
    from kdcache.models.lm import load_causal_lm

    mode, k = _mode(cfg)
    net, tok, info = load_causal_lm(cfg.teacher, cfg.max_length)
    max_length = _max_length(cfg, info)
    if cfg.dtype not in ("float16", "bfloat16", "float32"):
        raise KdcacheError(f"--dtype {cfg.dtype}; expected float16 or bfloat16")
    files = tokenizer_files(tok)
    from kdcache.cache.blobs import pack_files

    _blob, tok_attrs = pack_files(files)
    rows = iter_rows(cfg.dataset, cfg.data_root, cfg.split, cfg.text_column)
    corpus = tokenize_corpus(rows, tok, max_length, info["vocab_size"], cfg.max_samples)
    try:
        dataset = {"name": cfg.dataset if not cfg.dataset.startswith("hfds:") else "hfds",
                   "split": cfg.split, "n": len(corpus), "n_tokens": corpus.n_tokens,
                   "rows": corpus.n_rows, "fingerprint": corpus.fingerprint}  # fmt: skip
        cs = max(1, int(cfg.chunk_samples))
        spec = token_spec(
            info, tok_attrs["sha256"], dataset, mode=mode, k=k, max_length=max_length,
            dtype=cfg.dtype, top_p=cfg.top_p, seed=cfg.seed, chunk_samples=cs,
            compression=cfg.compression, token_chunk=pick_token_chunk(corpus.lengths, cs),
        )  # fmt: skip
    except BaseException:
        corpus.close()
        raise
    return net, files, spec, corpus, info


def run_lm(cfg: PrecomputeConfig) -> dict:
    rt = init_runtime(cfg.device)
    try:
        return _run(cfg, rt)
    finally:
        shutdown(rt)


def _run(cfg: PrecomputeConfig, rt) -> dict:
    from kdcache.cache.backends import backend_class, exists, infer_backend
    from kdcache.cache.tokenstore import token_key
    from kdcache.cache.tokenwriter import create_token_cache

    t0 = time.perf_counter()
    net, files, spec, corpus, info = build(cfg)
    try:
        backend = cfg.format or ("hdf5" if cfg.out.lower().endswith((".h5", ".hdf5")) else "zarr")
        path = _out_path(cfg, token_key(spec), backend)
        infer_backend(path, backend)
        if rt.distributed and backend == "hdf5":
            raise KdcacheError("a token cache under torchrun needs a .zarr --out")
        existed = exists(path, cfg.storage_options or None)
        kw = dict(keys=corpus.keys, lengths=corpus.lengths, tokenizer=files,
                  provenance={"command": cfg.command, "data_root": cfg.data_root},
                  backend=backend, storage_options=cfg.storage_options or None)  # fmt: skip
        writer = main_then_others(
            rt,
            lambda: create_token_cache(path, spec, overwrite=cfg.overwrite,
                                       break_lock=cfg.break_lock, **kw),
            lambda: create_token_cache(path, spec, lock=False, **kw),
        )  # fmt: skip
        try:
            kl = _compute(cfg, rt, net, spec, corpus, writer)
        except KdcacheError:
            writer.close()
            if rt.is_main and not existed:
                backend_class(backend).delete(path, cfg.storage_options or None)
            raise
        kl = _reduce_kl(rt, kl)
        barrier(rt)
        if rt.is_main and not writer.missing_chunks():
            extra = None
            if cfg.kl_sample:
                extra = {"kl_sample": {
                    "tokens": int(kl[1]), "mean_kl": float(kl[0] / max(kl[1], 1)),
                    "direction": "KL(teacher||stored)" if spec["tokens"]["mode"] == "topk"
                    else "KL(stored||teacher)"}}  # fmt: skip
            writer.finalize(extra)
        else:
            writer.close()
        barrier(rt)
    finally:
        corpus.close()
    if not rt.is_main:
        return {}
    from kdcache.cache.tools import info as cache_info

    d = cache_info(path, storage_options=cfg.storage_options or None)
    secs = time.perf_counter() - t0
    return {"path": path, "key": token_key(spec), "kind": "tokens", "samples": len(corpus),
            "tokens": corpus.n_tokens, "bytes": d.get("size_bytes"), "complete": d.get("complete"),
            "seconds": round(secs, 2), "tokens_per_s": round(corpus.n_tokens / max(secs, 1e-9), 1),
            "kl_sample": d.get("kl_sample")}  # fmt: skip


def _reduce_kl(rt, kl: list[float]) -> list[float]:
    if not rt.distributed:
        return kl
    import torch.distributed as dist

    t = torch.tensor(kl, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _compute(cfg, rt, net, spec, corpus, writer) -> list[float]:
    from kdcache.precompute.config import parse_shard

    index, count = parse_shard(cfg.shard)  # --shard I/N: chunks c % N == I, dealt to ranks
    if index >= writer.n_chunks:
        raise KdcacheError(f"--shard {cfg.shard}: the cache has only {writer.n_chunks} chunks")
    todo = [c for c in writer.todo_chunks()
            if c % count == index and (c // count) % rt.world_size == rt.rank]  # fmt: skip
    net.to(rt.device)
    amp = cfg.amp and rt.device.type == "cuda"
    kl = [0.0, 0.0]
    n_tok = sum(int(corpus.offsets[min((c + 1) * writer.chunk_samples, len(corpus))]
                    - corpus.offsets[c * writer.chunk_samples]) for c in todo)  # fmt: skip
    with tqdm(total=n_tok, unit="tok", disable=not rt.is_main, desc="precompute-lm",
              dynamic_ncols=True) as bar:  # fmt: skip
        for c in todo:
            arrays = chunk_targets(net, spec, corpus, *writer.chunk_rows(c), cfg.batch_size,
                                   rt.device, amp, cfg.kl_sample, kl)  # fmt: skip
            writer.write_chunk(c, arrays)
            bar.update(len(arrays["input_ids"]))
    return kl


@torch.inference_mode()
def chunk_targets(net, spec, corpus, lo, hi, batch_size, device, amp=False, kl_rows=0, kl=None):
    """The stored per-token arrays of samples [lo, hi) (concatenated in row order)."""
    t = spec["tokens"]
    mode, k, dtype, vocab = t["mode"], t["k"], t["dtype"], t["vocab_size"]
    lengths = corpus.lengths[lo:hi]
    offs = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offs[-1])
    ids_out = np.zeros((n, k), np.int64)
    val_out = np.zeros((n, k), np.float32)
    tail_out = np.zeros(n, np.float32)
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    for b0 in range(0, len(order), max(1, batch_size)):
        rows = order[b0 : b0 + max(1, batch_size)]
        width = int(lengths[rows].max())
        x = torch.zeros((len(rows), width), dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids, _m = corpus.sample(lo + int(r))
            x[j, : len(ids)] = torch.from_numpy(ids)
            att[j, : len(ids)] = 1
        x, att = x.to(device), att.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(input_ids=x, attention_mask=att).logits
        real_pos = att.bool()  # row-major over (batch row, position), like the flat arrays
        want_kl = kl is not None and kl_rows and lo + int(rows.min()) < kl_rows
        real = logits[real_pos] if (mode == "sampled" or want_kl) else None
        if mode == "topk":  # on the padded batch: no (n, V) copy; logits consumed in place
            vals, ids, tail = (x[real_pos] for x in topk_targets(logits, k, t["top_p"]))
        else:
            pos = np.concatenate([np.arange(lengths[r]) for r in rows])
            grow = np.concatenate([np.full(lengths[r], lo + r) for r in rows])
            u = torch.from_numpy(draw_uniforms(t["seed"], grow, pos, k)).to(device)
            ids = sampled_targets(real, u)
        if want_kl:
            sel = torch.from_numpy(
                np.concatenate([np.full(lengths[r], lo + r < kl_rows) for r in rows])
            ).to(device)
            if sel.any():
                if mode == "topk":
                    kl[0] += float(kl_to_dense(real[sel], ids[sel], vals[sel], mode, k))
                else:
                    d_ids, d_cnt = distinct_counts(ids[sel].cpu().numpy())
                    d_ids_t = torch.from_numpy(d_ids).to(device)
                    d_cnt_t = torch.from_numpy(d_cnt).to(device).float()
                    kl[0] += float(kl_to_dense(real[sel], d_ids_t, d_cnt_t, mode, k))
                kl[1] += int(sel.sum())
        ids_h = ids.cpu().numpy()
        if mode == "topk":
            vals_h, tail_h = vals.cpu().numpy(), tail.cpu().numpy()
        at = 0
        for r in rows:
            m = int(lengths[r])
            dst = slice(int(offs[r]), int(offs[r]) + m)
            ids_out[dst, : ids_h.shape[1]] = ids_h[at : at + m]
            if mode == "topk":
                val_out[dst, : ids_h.shape[1]] = vals_h[at : at + m]
                val_out[dst, ids_h.shape[1] :] = -np.inf
                tail_out[dst] = tail_h[at : at + m]
            else:
                val_out[dst] = 0
            at += m
    input_ids, mask = corpus.span(lo, hi)
    out = {"input_ids": input_ids.astype(np.uint16 if vocab <= 1 << 16 else np.int32),
           "loss_mask": mask.astype(np.uint8)}  # fmt: skip
    if mode == "sampled":
        ids_out, counts = distinct_counts(ids_out)
        out["counts"] = counts.astype(np.uint8 if k < 256 else np.uint16)
    else:
        out["logprobs"] = encode(val_out, dtype)
        out["tail"] = encode(tail_out, dtype)
    out.update(pack_ids(ids_out, id_packing(vocab)))
    return out
