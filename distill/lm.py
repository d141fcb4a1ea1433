"""Stage 2 for language models: train a causal-LM student from a token cache (sparse KL over
the teacher's stored top-k + tail, or sampled targets, mixed with CE), or plain next-token CE
without a cache (how the teacher is trained). DDP under torchrun; checkpoints and --resume as
classification runs; metrics = held-out loss and perplexity."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from kdcache.cache.errors import KdcacheError
from kdcache.distill import lmsetup
from kdcache.distill.checkpoint import commit_epoch, prepare_out
from kdcache.distill.lmdata import CacheRows, TextWindows, epoch_rows, read_text_rows, token_windows
from kdcache.distill.lmloss import get_lm_loss, lm_loss_needs_cache
from kdcache.distill.metrics import MetricsLog
from kdcache.models.runtime import Runtime, barrier, write_run_config
from tqdm import tqdm

log = logging.getLogger(__name__)


def _sum(rt: Runtime, d: dict[str, float]) -> dict[str, float]:
    if not rt.distributed:
        return d
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def lr_at(cfg, step: int, total: int, per_epoch: int) -> float:
    """Per optimizer step: linear warmup over warmup_epochs, then constant / cosine (to 0 at
    the last step) / step (x gamma at each milestone epoch)."""
    warm = round(cfg.warmup_epochs * per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        frac = (step - warm) / max(total - warm, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    if cfg.schedule == "step":
        epoch = step // max(per_epoch, 1)
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


def _build(cfg, rt: Runtime):
    """Cache, loss, student, tokenizer and data; every check before a file is written."""
    try:
        hp = dict(cfg.hparams)
        loss_fn = get_lm_loss(cfg.loss, **hp)
        needs = lm_loss_needs_cache(cfg.loss)
    except ValueError as e:
        raise KdcacheError(str(e)) from None
    if len(cfg.caches) > 1:
        raise KdcacheError("a language-model student reads one token cache; got several --cache")
    cache = lmsetup.token_cache_of(cfg.caches[0], cfg.storage_options) if cfg.caches else None
    if needs and cache is None:
        raise KdcacheError(f"--loss {cfg.loss} needs a token cache (--cache X.zarr)")
    if cache is not None and cache.mode == "sampled" and needs and hp.get("T", 1.0) != 1.0:
        raise KdcacheError(
            f"--temperature {hp['T']}: the sampled cache {lmsetup.cache_name(cache)!r} holds "
            "draws at T=1; expected --temperature 1"
        )
    model, d = lmsetup.load_student(cfg.student, cfg.seed)
    tok = lmsetup.student_tokenizer(cfg.student, d, cache)
    max_length = int(cache.max_length) if cache is not None else int(cfg.max_length)
    lmsetup.check_student_fits(model, cfg.student, len(tok), max_length)
    if cache is not None and int(cache.vocab_size) > int(model.config.vocab_size):
        raise KdcacheError(
            f"--student {cfg.student!r} has vocab_size {model.config.vocab_size} < the "
            f"teacher's {cache.vocab_size}"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if cache is not None:
        train = CacheRows(cache, pad, with_targets=needs)
    else:
        _, texts = read_text_rows(cfg.data_root, cfg.split)
        train = TextWindows(token_windows(tok, texts, max_length), pad)
    if cfg.max_samples is not None and cache is None:
        train.windows = train.windows[: cfg.max_samples]
    if len(train) < rt.world_size:
        raise KdcacheError(f"{len(train)} training rows for {rt.world_size} ranks; expected more")
    held = lmsetup.heldout_windows(cfg, tok, max_length)
    test = TextWindows(held, pad) if held else None
    return cache, loss_fn, model, train, test


@torch.no_grad()
def evaluate_lm(model, data: TextWindows, device, batch_size: int, rank=0, world=1, amp=True):
    """Summed next-token CE and token count over held-out windows (this rank's share)."""
    model.eval()
    loss_sum, n = 0.0, 0.0
    use_amp = amp and device.type == "cuda"
    for a in range(rank * batch_size, len(data), batch_size * world):
        b = data.batch(list(range(a, min(a + batch_size, len(data))))).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        flat = logits.reshape(-1, logits.shape[-1])[b.pos].float()
        ce = torch.nn.functional.cross_entropy(flat, b.labels, reduction="none")
        loss_sum += float((ce * b.weight).sum())
        n += float(b.weight.sum())
    model.train()
    return {"loss_sum": loss_sum, "tokens": n}


def run_lm(cfg, rt: Runtime) -> dict:
    """Train an LM student end to end; returns the final record (also in OUT/metrics.jsonl)."""
    torch.manual_seed(cfg.seed)
    cache, loss_fn, model, train, test = _build(cfg, rt)
    out = Path(cfg.out)
    cache_keys = [cache.key] if cache is not None else []
    ck = prepare_out(cfg, rt.is_main, cache_keys)
    model = model.to(rt.device)
    ddp = model
    if rt.distributed:
        dev = [rt.device.index] if rt.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=dev)
    if cfg.compile:
        ddp = torch.compile(ddp)
    from kdcache.distill.setup import make_optimizer

    opt = make_optimizer(cfg, model)
    metrics = MetricsLog(out, enabled=rt.is_main)
    start, step, best, best_epoch = 0, 0, -math.inf, -1
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, step, best = ck["epoch"] + 1, ck["step"], ck["best_acc"]
        best_epoch = ck.get("best_epoch", -1)
        metrics.truncate(start)
    if rt.is_main:
        write_run_config(out / "config.yaml", cfg.cli_options, "distill")
    n_batches = len(train) // cfg.batch_size + (len(train) % cfg.batch_size >= rt.world_size)
    per_epoch = max(1, math.ceil(n_batches / cfg.accum_steps))
    total = cfg.max_steps or per_epoch * cfg.epochs
    use_amp = cfg.amp and rt.device.type == "cuda"
    record: dict = {}
    if ck is not None and start >= cfg.epochs:
        record = {**ck.get("record", {}), "already_finished": True}
    bar = tqdm(range(start, cfg.epochs), desc="distill-lm", unit="epoch", disable=not rt.is_main)
    for epoch in bar:
        model.train()
        sums: dict[str, float] = {}
        t0, micro = time.perf_counter(), 0
        rows = epoch_rows(len(train), cfg.batch_size, cfg.seed, epoch, rt.rank, rt.world_size)
        for batch_rows in rows:
            b = train.batch(batch_rows).to(rt.device)
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = ddp(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            flat = logits.reshape(-1, logits.shape[-1])[b.pos]
            res = loss_fn(flat, b.targets, b.labels, b.weight)
            (res["loss"] / cfg.accum_steps).backward()
            micro += 1
            tokens = float(b.weight.sum())
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + float(v) * tokens
            sums["tokens"] = sums.get("tokens", 0.0) + tokens
            if micro % cfg.accum_steps == 0:
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step, total, per_epoch)
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
        opt.zero_grad(set_to_none=True)  # a partial accumulation does not leak into the next
        seconds = time.perf_counter() - t0
        sums = _sum(rt, sums)
        stop = cfg.max_steps is not None and step >= cfg.max_steps
        last = stop or epoch + 1 == cfg.epochs
        ev = None
        if test is not None and (last or (epoch + 1) % cfg.eval_every == 0):
            ev = _sum(rt, evaluate_lm(model, test, rt.device, cfg.batch_size, rt.rank,
                                      rt.world_size, cfg.amp))  # fmt: skip
        record = _record(epoch, step, opt.param_groups[0]["lr"], sums, ev, seconds)
        score = -record.get("test_loss", record["loss"])
        if score > best:
            best, best_epoch = score, epoch
        record["best_epoch"] = best_epoch
        if "test_ppl" in record:
            record["best_test_ppl"] = round(math.exp(-best), 4) if best_epoch >= 0 else None
        if rt.is_main:
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
                "epoch": epoch, "step": step, "best_acc": best, "best_epoch": best_epoch,
                "config": cfg.to_dict(), "cache_keys": cache_keys, "record": record,
                "model_info": {"name": cfg.student, "task": "causal-lm"},
            }  # fmt: skip
            commit_epoch(out, metrics, record, state, best_epoch == epoch)
            bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=record.get("test_ppl"))
        barrier(rt)
        if stop:
            break
    if not rt.is_main:
        return {}
    if record:
        record["best_path"] = str(out / "best.pt") if best_epoch >= 0 else None
    return record


def _record(epoch, step, lr, sums, ev, seconds) -> dict:
    n = max(sums.get("tokens", 0.0), 1.0)
    rec = {"task": "lm", "epoch": epoch, "step": step, "lr": lr}
    rec.update({k: v / n for k, v in sorted(sums.items()) if k != "tokens"})
    rec["train_ppl"] = math.exp(min(rec.get("ce", 0.0), 50.0))
    rec["train_tokens"] = int(sums.get("tokens", 0.0))
    rec["epoch_seconds"] = seconds
    rec["tokens_per_s"] = sums.get("tokens", 0.0) / max(seconds, 1e-9)
    if ev is not None and ev["tokens"] > 0:
        rec["test_loss"] = ev["loss_sum"] / ev["tokens"]
        rec["test_ppl"] = math.exp(min(rec["test_loss"], 50.0))
        rec["test_tokens"] = int(ev["tokens"])
    return {k: (float(np.round(v, 6)) if isinstance(v, float) else v) for k, v in rec.items()}


def lm_summary_line(rec: dict, out: str) -> str:
    """The LM run's final line: loss, held-out loss and perplexity, speed, where best.pt is."""
    head = "already finished (nothing to resume)" if rec.get("already_finished") else "done"
    parts = [f"{head}: epoch {rec['epoch'] + 1}", f"loss {rec['loss']:.4f}"]
    if "test_ppl" in rec:
        parts.append(f"held-out loss {rec['test_loss']:.4f} ppl {rec['test_ppl']:.3f}")
    if rec.get("best_test_ppl") is not None:
        parts.append(f"best ppl {rec['best_test_ppl']:.3f} (epoch {rec['best_epoch'] + 1})")
    parts.append(f"{rec['tokens_per_s']:.0f} tokens/s")
    parts.append(f"best.pt: {rec['best_path']}" if rec.get("best_path") else f"run: {out}")
    return "  ".join(parts)
