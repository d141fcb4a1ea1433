"""Stage 2 for causal-LM students: train from a token cache (sparse KL / sampled KD + CE), or
without a cache on a text corpus (plain next-token CE: how a teacher LM is trained).

Dispatched from `distill.train.run` when the cache is a token cache or the student is a causal
LM. Metrics per epoch (metrics.jsonl): train loss terms, tokens/s, held-out loss and perplexity
(token mean over the held-out text, tokenized with the cache's tokenizer). Checkpoints and
--resume as for classifiers (last.pt/best.pt, best = lowest held-out loss); the best model is
also written as a Hugging Face directory, OUT/hf, usable as `--teacher hf:OUT/hf`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from kdcache.distill.checkpoint import commit_epoch, prepare_out
from kdcache.distill.config import DistillConfig
from kdcache.distill.lmdata import collate, epoch_order, rank_batches
from kdcache.distill.lmsetup import LMRun, build_lm_run
from kdcache.distill.metrics import MetricsLog
from kdcache.distill.setup import make_optimizer, make_scheduler
from kdcache.models.runtime import Runtime, barrier, write_run_config
from tqdm import tqdm

log = logging.getLogger(__name__)


def _sum_ranks(rt: Runtime, d: dict) -> dict:
    if not rt.distributed:
        return d
    keys = sorted(d)  # on the device: nccl reduces CUDA tensors only
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _global_count(rt: Runtime, n: int) -> int:
    """The kept tokens of the whole global batch (every rank's)."""
    if not rt.distributed:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=rt.device)
    dist.all_reduce(t)
    return int(t.item())


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Dropout's RNG seed for one epoch of one rank: a resumed run draws the same masks."""
    rng = np.random.Generator(np.random.Philox(key=[int(seed) & (2**64 - 1), int(epoch)]))
    return int(rng.integers(0, 2**62, size=rank + 1)[rank])


def _forward(model, b: dict, device: torch.device, amp: bool) -> torch.Tensor:
    """(N, V) float logits of the kept positions."""
    x = b["input_ids"].to(device, non_blocking=True)
    m = b["attention_mask"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        logits = model(x, m)
    return logits[b["keep"].to(device)].float()


def train_lm_epoch(r: LMRun, ddp, opt, cfg: DistillConfig, rt: Runtime, epoch: int, step: int,
                   warmup_steps: int):  # fmt: skip
    """One epoch; returns (sums of token-weighted terms + tokens, seconds, the new step).

    Under DDP each rank takes its share of a global batch (`rank_batches`) and its loss, a
    mean over its own kept tokens, is weighted by world · n_rank / n_global: DDP's gradient
    average is then the token mean over the whole global batch, as one process computes it.
    A rank whose share is empty (or has no kept token) still runs forward/backward with weight
    0, so every rank takes part in every gradient all-reduce."""
    ddp.train()
    device = rt.device
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, rt.rank))
    sums: dict[str, torch.Tensor] = {}
    tokens, t0 = 0, time.perf_counter()
    order = epoch_order(len(r.train), cfg.seed, epoch)
    for rows, first in rank_batches(order, cfg.batch_size, rt.rank, rt.world_size, True):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        b = collate(r.train.fetch(rows if len(rows) else first))
        n = int(b["keep"].sum()) if len(rows) else 0
        total = _global_count(rt, n)
        if total == 0:  # no rank has a token to learn from: skip the step everywhere
            continue
        s = _forward(ddp, b, device, cfg.amp)
        if n == 0:
            (s.sum() * 0.0).backward()  # this rank's zero share of the all-reduce
        else:
            t = None if b["targets"] is None else b["targets"].to(device)
            out = r.loss_fn(s, b["labels"].to(device, non_blocking=True), t)
            (out["loss"] * (rt.world_size * n / total)).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * n
            tokens += n
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.clip_grad)
        base = [g["lr"] for g in opt.param_groups]
        if step < warmup_steps:  # the scheduler owns the lr; warmup scales this step's only
            for g in opt.param_groups:
                g["lr"] = g["lr"] * (step + 1) / warmup_steps
        opt.step()
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        step += 1
    host = {k: float(v) for k, v in sums.items()}
    host["tokens"] = float(tokens)
    return host, time.perf_counter() - t0, step


@torch.no_grad()
def evaluate_lm(model, rows, rt: Runtime, batch_size: int, amp: bool) -> dict:
    """Held-out next-token CE summed over every counted token (this rank's rows)."""
    model.eval()
    loss, n = torch.zeros((), dtype=torch.float64, device=rt.device), 0
    for part in rank_batches(np.arange(len(rows)), batch_size, rt.rank, rt.world_size):
        b = collate(rows.fetch(part))
        if not int(b["keep"].sum()):
            continue
        s = _forward(model, b, rt.device, amp)
        y = b["labels"].to(rt.device)
        loss += torch.nn.functional.cross_entropy(s, y, reduction="sum").double()
        n += len(y)
    return {"loss_sum": float(loss), "n": float(n)}


def run_lm(cfg: DistillConfig, rt: Runtime) -> dict:
    """Train end to end; returns the final record (also the last line of OUT/metrics.jsonl)."""
    torch.manual_seed(cfg.seed)
    r = build_lm_run(cfg, rt)
    out = Path(cfg.out)
    keys = [r.cache.key] if r.cache is not None else []
    ck = prepare_out(cfg, rt.is_main, keys)
    model = r.model.to(rt.device)
    ddp = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        ddp = torch.compile(ddp)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    metrics = MetricsLog(out, enabled=rt.is_main)
    start, step, best, best_epoch = 0, 0, math.inf, -1
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, step = ck["epoch"] + 1, ck["step"]
        best = ck.get("best_loss", math.inf)
        best_epoch = -1 if ck.get("best_epoch") is None else ck["best_epoch"]
        metrics.truncate(start)
    if rt.is_main:
        write_run_config(out / "config.yaml", cfg.cli_options, "distill")
    per_epoch = math.ceil(len(r.train) / cfg.batch_size)
    warmup = round(cfg.warmup_epochs * per_epoch)
    record: dict = {}
    if ck is not None and start >= cfg.epochs:
        record = {**ck.get("record", {}), "already_finished": True}
    bar = tqdm(range(start, cfg.epochs), desc="distill-lm", unit="epoch",
               disable=not rt.is_main, dynamic_ncols=True)  # fmt: skip
    for epoch in bar:
        lr = opt.param_groups[0]["lr"]
        sums, seconds, step = train_lm_epoch(r, ddp, opt, cfg, rt, epoch, step, warmup)
        sums = _sum_ranks(rt, sums)
        stop = cfg.max_steps is not None and step >= cfg.max_steps
        last = stop or epoch + 1 == cfg.epochs
        ev = None
        if r.test is not None and (last or (epoch + 1) % cfg.eval_every == 0):
            ev = _sum_ranks(rt, evaluate_lm(model, r.test, rt, cfg.batch_size, cfg.amp))
        record = _record(epoch, step, lr, sums, seconds, ev)
        sched.step()
        score = record.get("test_loss", record["loss"] if r.test is None else None)
        is_best = score is not None and score < best
        if is_best:
            best, best_epoch = score, epoch
        record["best_loss"], record["best_epoch"] = best, best_epoch
        record["best_ppl"] = _ppl(best)
        if rt.is_main:
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "step": step,
                "best_acc": None, "best_loss": best, "best_epoch": best_epoch,
                "config": cfg.to_dict(), "cache_keys": keys, "model_info": r.info,
                "record": record,
            }  # fmt: skip
            commit_epoch(out, metrics, record, state, is_best)
            bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record.get('test_ppl', 0):.2f}")
        barrier(rt)
        if stop:
            break
    if not rt.is_main:
        return {}
    metrics.finish(plots=False)
    if record:
        record["best_path"] = str(out / "best.pt") if (out / "best.pt").exists() else None
        record["hf_dir"] = _export(r, out)
    return record


def _ppl(loss: float) -> float:
    return float(math.exp(min(loss, 700.0))) if math.isfinite(loss) else math.inf


def _record(epoch: int, step: int, lr: float, sums: dict, seconds: float, ev: dict | None):
    n = max(sums.pop("tokens", 0.0), 1.0)
    rec = {"task": "lm", "epoch": epoch, "step": step, "lr": lr}
    rec.update({k: v / n for k, v in sorted(sums.items())})
    rec["train_ppl"] = _ppl(rec.get("ce", rec.get("loss", math.inf)))
    if ev is not None and ev["n"]:
        rec["test_loss"] = ev["loss_sum"] / ev["n"]
        rec["test_ppl"] = _ppl(rec["test_loss"])
        rec["test_tokens"] = int(ev["n"])
    rec["tokens"] = int(n)
    rec["epoch_seconds"] = seconds
    rec["tokens_per_s"] = n / max(seconds, 1e-9)
    return {k: (float(np.round(v, 6)) if isinstance(v, float) else v) for k, v in rec.items()}


def _export(r: LMRun, out: Path) -> str | None:
    """best.pt's weights (last.pt's without a best) as a save_pretrained directory + tokenizer."""
    from kdcache.distill.checkpoint import load_checkpoint

    src = out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"
    if not src.exists():
        return None
    model = r.model.to("cpu")
    model.load_state_dict(load_checkpoint(src)["model"])
    dest = out / "hf"
    model.net.save_pretrained(dest)
    r.tokenizer.save_pretrained(dest)
    return str(dest)


def lm_summary_line(rec: dict, out: str) -> str:
    """The run's final line: held-out loss and perplexity (last and best) and where it is."""
    head = "already finished (nothing to resume)" if rec.get("already_finished") else "done"
    parts = [f"{head}: epoch {rec['epoch'] + 1}", f"loss {rec['loss']:.4f}"]
    if "test_ppl" in rec:
        parts.append(f"held-out loss {rec['test_loss']:.4f} ppl {rec['test_ppl']:.3f}")
    if rec.get("best_epoch", -1) >= 0:
        parts.append(f"best ppl {rec['best_ppl']:.3f} (epoch {rec['best_epoch'] + 1})")
    parts.append(f"{rec.get('tokens_per_s', 0):.0f} tokens/s")
    parts.append(f"model: {rec['hf_dir']}" if rec.get("hf_dir") else f"run: {out}")
    return "  ".join(parts)
