"""Stage 2: train a student from cached teacher logits, replaying the views the teacher saw.

`distill --loss ce` (or `mrkd`) without a cache is plain training: that is how teachers are
trained. Checkpoints carry their config; `--resume` continues from the last finished epoch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from distill.config import DistillConfig
from distill.loop import BatchMaker, epoch_batches, evaluate_model, prefetch_depth, train_epoch
from distill.metrics import MetricsLog
from distill.setup import build_run, make_optimizer, make_scheduler
from models.runtime import Runtime, barrier, init_runtime, shutdown

log = logging.getLogger(__name__)


def _reduce(rt: Runtime, d: dict) -> dict:
    """Sum metric dicts over ranks (keys are identical on every rank)."""
    if not rt.distributed:
        return d
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temp name, then rename: a killed run never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(cfg: DistillConfig) -> dict:
    """Train end to end; returns the final metrics record (also in OUT/metrics.jsonl)."""
    rt = init_runtime(cfg.device)
    try:
        return _run(cfg, rt)
    finally:
        shutdown(rt)


def _run(cfg: DistillConfig, rt: Runtime) -> dict:
    torch.manual_seed(cfg.seed)
    r = build_run(cfg, rt)
    out = Path(cfg.out)
    model = r.model.to(rt.device)
    if rt.device.type == "cuda" and r.modality == "image":
        model = model.to(memory_format=torch.channels_last)
    ddp = model
    if rt.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    metrics = MetricsLog(out, enabled=rt.is_main)
    start_epoch, step, best = 0, 0, -1.0
    if cfg.resume and (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, step, best = ck["epoch"] + 1, ck["step"], ck["best_acc"]
        if r.mrkd is not None:
            r.mrkd.load_state(model, ck.get("mrkd", []))
        metrics.truncate(start_epoch)
        log.info("resumed %s at epoch %d (step %d)", out, start_epoch, step)
    elif cfg.resume:
        log.warning("--resume: no %s/last.pt yet; starting from scratch", out)
    on_step = None
    if r.mrkd is not None:
        on_step = lambda s: r.mrkd.maybe_snapshot(model, s)  # noqa: E731
    make = BatchMaker(
        r.train, r.policy, r.teacher, seed=cfg.seed, rank=rt.rank, world_size=rt.world_size
    )
    record: dict = {}
    bar = tqdm(
        range(start_epoch, cfg.epochs),
        desc="distill",
        unit="epoch",
        disable=not rt.is_main,
        dynamic_ncols=True,
    )
    for epoch in bar:
        batches = epoch_batches(
            make,
            len(r.train),
            cfg.batch_size,
            cfg.seed,
            epoch,
            cfg.views,
            depth=prefetch_depth(rt.device, cfg.workers),
        )
        sums, step = train_epoch(
            model,
            ddp,
            batches,
            r.loss_fn,
            opt,
            rt.device,
            teacher=r.live_teacher,
            amp=cfg.amp,
            reg_fn=r.reg_fn,
            on_step=on_step,
            max_steps=cfg.max_steps,
            step=step,
        )
        if r.mrkd is not None:  # MrKD refreshes its copies on the true epoch boundary
            r.mrkd.end_epoch(model, epoch)
        seconds = sums.pop("seconds")
        sums = _reduce(rt, sums)
        ev = (
            _reduce(
                rt,
                evaluate_model(
                    model, r.test, r.policy, rt.device, rank=rt.rank, world_size=rt.world_size
                ),
            )
            if r.test is not None
            else None
        )
        record = _record(epoch, sched.get_last_lr()[0], sums, ev, seconds, step)
        sched.step()
        acc = record.get("test_acc", record["train_acc"])
        is_best = acc > best
        best = max(best, acc)
        record["best_acc"] = best
        if rt.is_main:
            metrics.append(record)
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "step": step,
                "best_acc": best,
                "config": cfg.to_dict(),
                "model_info": r.info,
                "record": record,
            }
            if r.mrkd is not None:
                state["mrkd"] = r.mrkd.state()
            save_checkpoint(out / "last.pt", state)
            if is_best:
                save_checkpoint(out / "best.pt", state)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{acc:.3f}")
        barrier(rt)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    if rt.is_main:
        metrics.finish(plots=cfg.plots)
    return record


def _record(epoch, lr, sums, ev, seconds, step) -> dict:
    n = max(sums.get("n", 0.0), 1.0)
    skip = {"n", "correct", "teacher_correct", "n_teacher", "reg_count"}
    rec = {"epoch": epoch, "step": step, "lr": lr}
    rec.update({k: v / n for k, v in sorted(sums.items()) if k not in skip})
    rec["train_acc"] = sums.get("correct", 0.0) / n
    if sums.get("n_teacher"):
        rec["teacher_train_acc"] = sums["teacher_correct"] / sums["n_teacher"]
        rec["reg_samples"] = int(sums.get("reg_count", 0))
        rec["reg_fraction"] = sums.get("reg_count", 0.0) / sums["n_teacher"]
    if ev is not None:
        rec["test_acc"] = ev["correct"] / max(ev["n"], 1.0)
        rec["test_loss"] = ev["loss_sum"] / max(ev["n"], 1.0)
    rec["samples"] = int(sums.get("n", 0))
    rec["epoch_seconds"] = seconds
    rec["samples_per_s"] = sums.get("n", 0.0) / max(seconds, 1e-9)
    return {k: (float(np.round(v, 6)) if isinstance(v, float) else v) for k, v in rec.items()}
