"""One epoch of stage 2: step the student on the batches of `distill.batches` (metrics summed
on the device, one host sync per log interval), and evaluate it on the eval view."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from kdcache.distill.batches import (  # noqa: F401 - re-exported: the stage-2 loop API
    BatchMaker,
    epoch_batches,
    eval_batches,
    plan_epoch,
    views_per_sample,
)
from kdcache.distill.feed import prefetch_depth, to_input
from kdcache.distill.recipe import DeviceSums, Recipe, warmup_factor
from kdcache.models.runtime import forward

__all__ = ["BatchMaker", "epoch_batches", "eval_batches", "evaluate_model", "plan_epoch"]
__all__ += ["prefetch_depth", "train_epoch", "views_per_sample"]


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
    recipe: Recipe | None = None,
    channels_last: bool = False,
    log_every: int = 0,
    on_log=None,
    progress=None,
) -> tuple[dict, int]:
    """Train over `batches`; returns summed metrics (divide by 'n') and the new step count.

    Metrics accumulate on the device (`DeviceSums`): the host waits for the device once at
    the end of the epoch and once per `log_every` optimizer steps, where `on_log(step, sums)`
    gets the epoch's running sums. `progress(batches, samples, sums | None)` is called every
    step with host-side counts only (sums at log points). `history`, when given, receives
    every step's loss terms (a sync per step: tests and benches only).
    """
    rc = recipe or Recipe()
    model.train()
    acc = DeviceSums(device)
    n_seen, n_teacher, micro = 0, 0, 0
    t0 = time.perf_counter()
    use_amp = amp and device.type == "cuda"
    accum = max(1, rc.accum_steps)
    it = iter(batches)
    nxt = next(it, None)
    while nxt is not None:
        if max_steps is not None and step >= max_steps:
            break
        b, nxt = nxt, next(it, None)
        x = to_input(b["views"], device, channels_last)
        y = b["labels"].to(device, non_blocking=True)
        mixed = None
        if "mix_lam" in b:  # Mixup/CutMix views: CE against the λ-mixed ground truth
            lam = b["mix_lam"].to(device, non_blocking=True)
            y2 = b["mix_labels"].to(device, non_blocking=True)
            mixed = (y, y2, lam)
            y = torch.where(lam >= 0.5, y, y2)  # the dominant label, for accuracy counts
        t = b["teacher"]
        if teacher is not None and teacher.needs_views:
            t = teacher.logits(b["samples"], b["augs"], x)
        t = None if t is None else t.to(device, non_blocking=True).float()
        micro += 1
        boundary = micro % accum == 0 or nxt is None
        sync_ctx = (
            ddp_model.no_sync()
            if not boundary and hasattr(ddp_model, "no_sync")
            else contextlib.nullcontext()
        )
        with sync_ctx:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                s = forward(ddp_model, x)
            s = s.float()
            y_loss = y if mixed is None else mixed_targets(*mixed, s.shape[1])
            out = loss_fn(s, t, y_loss)
            (out["loss"] / accum if accum > 1 else out["loss"]).backward()
        if boundary:
            step = _optimizer_step(model, optimizer, rc, step)
            if on_step is not None:
                on_step(step)
        if history is not None:
            history.append({k: float(v.detach()) for k, v in out.items()})
        n = len(y)
        n_seen += n
        vals = {k: v.detach() * n for k, v in out.items()}
        s = s.detach()
        vals["correct"] = (s.argmax(1) == y).sum()
        if t is not None:
            n_teacher += n
            vals["teacher_correct"] = (t.argmax(1) == y).sum()
            if reg_fn is not None:
                vals["reg_count"] = reg_fn(s, t, y)
        acc.add(vals)
        logged = None
        if log_every > 0 and boundary and step % log_every == 0 and on_log is not None:
            logged = _sums(acc, n_seen, n_teacher, t0)
            on_log(step, logged)
        if progress is not None:
            progress(micro, n_seen, logged)
    return _sums(acc, n_seen, n_teacher, t0), step


def mixed_targets(y: torch.Tensor, y2: torch.Tensor, lam: torch.Tensor, k: int) -> torch.Tensor:
    """timm's ``mixup_target`` per view: lam*onehot(y) + (1-lam)*onehot(y2), (N, K) float."""
    lam = lam.float()[:, None]
    return lam * F.one_hot(y, k).float() + (1.0 - lam) * F.one_hot(y2, k).float()


def _sums(acc: DeviceSums, n: int, n_teacher: int, t0: float) -> dict:
    out: dict = defaultdict(float, acc.pull())  # the host sync
    out["n"] = float(n)
    if n_teacher:
        out["n_teacher"] = float(n_teacher)
    out["seconds"] = time.perf_counter() - t0
    return dict(out)


def _optimizer_step(model, optimizer, rc: Recipe, step: int) -> int:
    """Clip, warm up the lr, step, zero the gradients, update the EMA: no host sync."""
    if rc.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), rc.clip_grad)
    base = None
    if step < rc.warmup_steps:
        f = warmup_factor(step, rc.warmup_steps)
        base = [g["lr"] for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, base, strict=True):
            g["lr"] = lr * f
    optimizer.step()
    if base is not None:  # the scheduler owns the lr; warmup only scales this step's
        for g, lr in zip(optimizer.param_groups, base, strict=True):
            g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if rc.ema is not None:
        rc.ema.update(model)
    return step + 1


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    policy,
    device,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    *,
    ema=None,
    amp: bool = False,
    channels_last: bool = False,
) -> dict:
    """Top-1 accuracy and CE on the eval (identity) view of every sample of `dataset` (and of
    the `ema` model on the same views). Sums stay on the device; one host sync at the end."""
    models = {"": model} if ema is None else {"": model, "ema_": ema}
    for m in models.values():
        m.eval()
    acc = DeviceSums(device)
    labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))
    use_amp = amp and device.type == "cuda"
    for s, views in eval_batches(dataset, policy, batch_size, rank, world_size, workers):
        x = to_input(views, device, channels_last)
        y = labels[torch.from_numpy(s)].to(device, non_blocking=True)
        vals = {}
        for prefix, m in models.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = forward(m, x)
            out = out.float()
            vals[prefix + "correct"] = (out.argmax(1) == y).sum()
            vals[prefix + "loss_sum"] = F.cross_entropy(out, y, reduction="sum")
        acc.add(vals)
    res = {k: 0.0 for p in models for k in (p + "correct", p + "loss_sum")}
    res.update(acc.pull())
    res["n"] = float(len(range(rank, len(dataset), world_size)))
    return res
