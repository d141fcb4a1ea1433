"""Stage 2: train a student from cached teacher logits, replaying the views the teacher saw.

`distill --loss ce` (or `mrkd`) without a cache is plain training: that is how teachers are
trained. Checkpoints carry their config; `--resume` continues from the last finished epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from kdcache.distill.checkpoint import commit_epoch, prepare_out
from kdcache.distill.config import DistillConfig
from kdcache.distill.loop import (
    BatchMaker,
    epoch_batches,
    evaluate_model,
    prefetch_depth,
    train_epoch,
    views_per_sample,
)
from kdcache.distill.metrics import MetricsLog
from kdcache.distill.plots import run_title
from kdcache.distill.progress import EpochBar, check_options, place_on_device
from kdcache.distill.recipe import ModelEma, Recipe, epoch_lr, steps_per_epoch, warmup_factor
from kdcache.distill.setup import build_run, make_optimizer, make_scheduler
from kdcache.distill.steplog import StepLog
from kdcache.models.malloc import hold_heap, release_heap, trim, trimming
from kdcache.models.runtime import Runtime, barrier, init_runtime, shutdown, write_run_config
from tqdm import tqdm

log = logging.getLogger(__name__)


def _reduce(rt: Runtime, d: dict) -> dict:
    """Sum metric dicts over ranks (keys are identical on every rank)."""
    if not rt.distributed:
        return d
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def run(cfg: DistillConfig) -> dict:
    """Train end to end; returns the final metrics record (also in OUT/metrics.jsonl)."""
    from kdcache.distill.lmsetup import is_lm_run

    rt = init_runtime(cfg.device)
    try:
        if is_lm_run(cfg):  # a token cache / a causal-LM student: distill/lm.py
            from kdcache.distill.lm import run_lm

            cfg.validate()
            return run_lm(cfg, rt)
        return _run(cfg, rt)
    finally:
        release_heap()  # undoes _run's hold_heap (CPU) for the rest of the process
        shutdown(rt)


def _run(cfg: DistillConfig, rt: Runtime) -> dict:
    check_options(cfg)
    torch.manual_seed(cfg.seed)
    r = build_run(cfg, rt)
    trim()  # set-up transients (key lists, the row index) are freed: return their pages
    out = Path(cfg.out)
    cache_keys = [c.key for c in getattr(r.teacher, "caches", [])]
    ck = prepare_out(cfg, rt.is_main, cache_keys)  # refuses to clobber; resumes what matches
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    elif rt.device.type == "cpu":  # models/malloc.py: no page faults of fresh scratch per step
        hold_heap()
    model = r.model.to(rt.device)
    channels_last = cuda and r.modality == "image"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        place_on_device(r, rt.device)
    ddp = model
    if rt.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if cfg.compile:
        ddp = torch.compile(ddp)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
    metrics = MetricsLog(out, enabled=rt.is_main)
    steplog = StepLog(out, enabled=rt.is_main, tensorboard=cfg.tensorboard)
    start_epoch, step, best, best_epoch = 0, 0, -1.0, -1
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, step, best = ck["epoch"] + 1, ck["step"], ck["best_acc"]
        best_epoch = -1 if ck.get("best_epoch") is None else ck["best_epoch"]
        if r.mrkd is not None:
            r.mrkd.load_state(model, ck.get("mrkd", []))
        if ema is not None:  # from the resumed weights when the checkpoint has no EMA yet
            ema = ModelEma(model, cfg.ema_decay)
            if "ema" in ck:
                ema.load_state_dict(ck["ema"])
        metrics.truncate(start_epoch)
        steplog.truncate(step)
        log.info("resumed %s at epoch %d (step %d)", out, start_epoch, step)
    if rt.is_main:  # after build_run and the checkpoint were validated: bad input writes nothing
        write_run_config(out / "config.yaml", cfg.cli_options, "distill")
    on_step = None
    if r.mrkd is not None:
        on_step = lambda s: r.mrkd.maybe_snapshot(model, s)  # noqa: E731
    make = BatchMaker(
        r.train, r.policy, r.teacher, seed=cfg.seed, rank=rt.rank, world_size=rt.world_size,
        workers=cfg.workers, pin=cuda,
    )  # fmt: skip
    k = views_per_sample(cfg.views)  # 0: all cached views
    items = len(r.train) * (r.teacher.num_augs if k == 0 and r.teacher else max(k, 1))
    micro = steps_per_epoch(items, cfg.batch_size, rt.world_size)
    opt_steps = steps_per_epoch(items, cfg.batch_size, rt.world_size, cfg.accum_steps)
    recipe = Recipe(cfg.accum_steps, cfg.clip_grad, round(cfg.warmup_epochs * opt_steps), ema)

    def batches_for(epoch: int):
        depth = prefetch_depth(rt.device, cfg.workers)
        return trimming(  # models/malloc.py: RSS flat through the epoch
            epoch_batches(
                make, len(r.train), cfg.batch_size, cfg.seed, epoch, cfg.views, depth, pin=cuda
            )
        )

    record: dict = {}
    if ck is not None and start_epoch >= cfg.epochs:  # --resume of a finished run: say so
        record = {**ck.get("record", {}), "already_finished": True}
        record["best_acc"], record["best_epoch"] = best, best_epoch
    nxt = batches_for(start_epoch) if start_epoch < cfg.epochs else None
    bar = tqdm(
        range(start_epoch, cfg.epochs),
        desc="distill",
        unit="epoch",
        disable=not rt.is_main,
        dynamic_ncols=True,
    )
    for epoch in bar:
        lr, first_step = sched.get_last_lr()[0], step
        inner = EpochBar(
            rt.is_main,
            steplog,
            epoch,
            cfg.epochs,
            micro,
            lambda s: opt.param_groups[0]["lr"] * warmup_factor(s - 1, recipe.warmup_steps),
            lambda d: _reduce(rt, d),
        )
        sums, step = train_epoch(
            model,
            ddp,
            nxt,
            r.loss_fn,
            opt,
            rt.device,
            teacher=r.live_teacher,
            amp=cfg.amp,
            reg_fn=r.reg_fn,
            on_step=on_step,
            max_steps=cfg.max_steps,
            step=step,
            recipe=recipe,
            channels_last=channels_last,
            log_every=cfg.log_every,
            on_log=inner.log,
            progress=inner.progress,
        )
        inner.close()
        trim()  # models/malloc.py: RSS flat from epoch to epoch
        if r.mrkd is not None:  # MrKD refreshes its copies on the true epoch boundary
            r.mrkd.end_epoch(model, epoch)
        stop = cfg.max_steps is not None and step >= cfg.max_steps
        last = stop or epoch + 1 == cfg.epochs
        # the next epoch's batches are made (prefetch thread) while this one is evaluated
        nxt = batches_for(epoch + 1) if not last else None
        seconds = sums.pop("seconds")
        sums = _reduce(rt, sums)
        ev = None
        if r.test is not None and (last or (epoch + 1) % cfg.eval_every == 0):
            ev = _reduce(
                rt,
                evaluate_model(
                    model,
                    r.test,
                    r.policy,
                    rt.device,
                    rank=rt.rank,
                    world_size=rt.world_size,
                    workers=cfg.workers,
                    ema=None if ema is None else ema.module,
                    amp=cfg.amp,
                    channels_last=channels_last,
                ),
            )
        lr = epoch_lr(lr, first_step, step, recipe.warmup_steps)
        record = _record(epoch, lr, sums, ev, seconds, step)
        sched.step()
        acc = record.get("test_acc", record["train_acc"] if r.test is None else None)
        is_best = acc is not None and acc > best
        if is_best:
            best, best_epoch = acc, epoch
        record["best_acc"], record["best_epoch"] = best, best_epoch
        if rt.is_main:
            steplog.scalars("epoch", record, step)
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "step": step,
                "best_acc": best,
                "best_epoch": best_epoch,
                "config": cfg.to_dict(),
                "cache_keys": cache_keys,
                "model_info": r.info,
                "record": record,
            }
            if r.mrkd is not None:
                state["mrkd"] = r.mrkd.state()
            if ema is not None:
                state["ema"] = ema.state_dict()
            commit_epoch(out, metrics, record, state, is_best)
            shown = record.get("test_acc", record["train_acc"])
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{shown:.3f}")
        barrier(rt)
        if stop:
            break
    steplog.close()
    if not rt.is_main:
        return {}  # only rank 0 reports (and prints) the summary
    teachers = [c.spec.teacher.get("name", "?") for c in r.teacher.caches] if r.teacher else []
    metrics.finish(plots=cfg.plots, title=run_title(cfg, teachers))
    if record:
        record["best_path"] = str(out / "best.pt") if best_epoch >= 0 else None
    return record


def summary_line(rec: dict, out: str) -> str:
    """The run's final line: last and best accuracy and where best.pt is."""
    if rec.get("task") == "lm":
        from kdcache.distill.lm import lm_summary_line

        return lm_summary_line(rec, out)
    kind = "test" if "test_acc" in rec else "train"
    head = "already finished (nothing to resume)" if rec.get("already_finished") else "done"
    parts = [  # epochs counted from 1, as in the figures (metrics.jsonl keeps 0-based)
        f"{head}: epoch {rec['epoch'] + 1}",
        f"loss {rec['loss']:.4f}",
        f"last {kind} acc {rec.get('test_acc', rec['train_acc']):.4f}",
    ]
    if rec.get("best_epoch", -1) >= 0:
        parts.append(f"best {rec['best_acc']:.4f} (epoch {rec['best_epoch'] + 1})")
    if "ema_test_acc" in rec:
        parts.append(f"ema acc {rec['ema_test_acc']:.4f}")
    parts.append(f"{rec['samples_per_s']:.0f} samples/s")
    parts.append(f"best.pt: {rec['best_path']}" if rec.get("best_path") else f"run: {out}")
    return "  ".join(parts)


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
        if "ema_correct" in ev:
            rec["ema_test_acc"] = ev["ema_correct"] / max(ev["n"], 1.0)
            rec["ema_test_loss"] = ev["ema_loss_sum"] / max(ev["n"], 1.0)
    rec["samples"] = int(sums.get("n", 0))
    rec["epoch_seconds"] = seconds
    rec["samples_per_s"] = sums.get("n", 0.0) / max(seconds, 1e-9)
    return {k: (float(np.round(v, 6)) if isinstance(v, float) else v) for k, v in rec.items()}
