"""The peers of bench/distill.py, on the very batches kdcache's loop gets: a minimal
timm-style CE loop and timm's own online `LogitDistillationTask`. Not a test."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from kdcache.distill.config import DistillConfig
from kdcache.distill.feed import prefetch_depth
from kdcache.distill.loop import BatchMaker, epoch_batches
from kdcache.distill.progress import place_on_device
from kdcache.distill.setup import build_run, make_optimizer


def _raw(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The library net inside kdcache's `Normalized` wrapper, with its mean/std; timm's task
    reads them from `pretrained_cfg`, so set it to the same values."""
    net, mean, std = model.net, model.mean, model.std
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    cfg.update(mean=tuple(mean.flatten().tolist()), std=tuple(std.flatten().tolist()))
    net.pretrained_cfg = cfg
    if not hasattr(net, "num_classes"):
        net.num_classes = None
    net.in_chans = 3
    return net, mean, std


class PeerMode:
    """`plain CE` (teacher None) or `timm online` (teacher: a kdcache-built teacher model)."""

    def __init__(self, name: str, cfg: DistillConfig, rt, teacher=None, T: float = 4.0) -> None:
        torch.manual_seed(cfg.seed)  # the same student initialisation as every other mode
        r = build_run(DistillConfig(**{**cfg.to_dict(), "loss": "ce", "caches": []}), rt)
        dev = rt.device
        self.name, self.cfg, self.rt, self.r = name, cfg, rt, r
        self.cuda = dev.type == "cuda"
        if self.cuda:
            place_on_device(r, dev)
        net, mean, std = _raw(r.model.to(dev))
        self.mean, self.std = mean, std
        if self.cuda:
            net = net.to(memory_format=torch.channels_last)
        self.model = net
        self.opt = make_optimizer(cfg, net)
        self.task = None
        if teacher is not None:
            from timm.task.distillation import DistillationTeacher, LogitDistillationTask

            t_net, _, _ = _raw(teacher.to(dev))
            if self.cuda:
                t_net = t_net.to(memory_format=torch.channels_last)
            self.task = LogitDistillationTask(
                student_model=net,
                teacher_model=DistillationTeacher(t_net, device=dev),
                criterion=torch.nn.CrossEntropyLoss(),
                task_loss_weight=0.1,
                distill_loss_weight=0.9,
                temperature=T,
                device=dev,
                verbose=False,
            )
            if cfg.compile:
                self.task.compile()
        elif cfg.compile:
            self.model = torch.compile(net)
        self.make = BatchMaker(  # the same loader as kdcache's modes: workers, pinned
            r.train, r.policy, None, seed=cfg.seed, workers=cfg.workers, pin=self.cuda
        )
        self.epochs: list[float] = []
        self.steps: list[float] = []

    def epoch(self, epoch: int, max_steps: int | None = None) -> None:
        c, dev = self.cfg, self.rt.device
        n = len(self.r.train)
        depth = prefetch_depth(dev, c.workers)
        batches = epoch_batches(self.make, n, c.batch_size, c.seed, epoch, "one", depth, self.cuda)
        amp = c.amp and self.cuda
        (self.task or self.model).train()
        marks, seen = [], 0
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            if max_steps is not None and i >= max_steps:
                break
            x = b["views"].to(dev, non_blocking=True)
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            x = (x - self.mean) / self.std  # timm's loader normalizes on the device
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = b["labels"].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                if self.task is not None:
                    loss = self.task(x, y)["loss"]
                else:
                    loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            seen += len(y)
            marks.append(time.perf_counter())
        if self.cuda:
            torch.cuda.synchronize(dev)
        if max_steps is None:
            self.epochs.append(seen / (time.perf_counter() - t0))
            full = n // c.batch_size
            self.steps += [c.batch_size / (marks[i] - marks[i - 1]) for i in range(1, full)]
