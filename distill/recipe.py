"""The standard recipe knobs around a loss and the step's on-device bookkeeping.

Label smoothing of the CE term, student weight EMA, and `DeviceSums`: metric sums that stay
on the accelerator so a training step never waits for the host (one sync per log interval).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kdcache.cache.errors import KdcacheError


@dataclass
class Recipe:
    """Step-level options of `train_epoch` (timm train.py equivalents in the README)."""

    accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max global L2 norm of the gradients
    warmup_steps: int = 0  # linear lr warmup over this many optimizer steps
    ema: ModelEma | None = None  # student weight EMA, updated after every optimizer step


def ce_weight(loss: str, hp: dict) -> float:
    """Weight of the plain CE term inside a registered loss (what label smoothing rescales)."""
    if loss == "ce" or loss == "wsl":
        return 1.0
    if loss in ("kd", "mrkd"):
        return float(hp["ce_weight"])
    if loss in ("tfkd-reg", "tfkd-self", "lsr-os", "lsr-os-tc"):
        return 1.0 - float(hp["alpha"])
    raise KdcacheError(
        f"--label-smoothing does not apply to --loss {loss} (it smooths its own targets); "
        "use its eps hyper-parameter"
    )


def with_label_smoothing(fn, eps: float, weight: float):
    """`fn` with its CE term computed against (1-eps)*onehot + eps/K (timm/PyTorch
    `CrossEntropyLoss(label_smoothing=eps)`): adds weight*(CE_eps - CE), where
    CE_eps - CE = eps*(mean_k(-log p_k) - CE). The logged `ce` stays the unsmoothed CE."""
    if not 0.0 <= eps < 1.0:
        raise KdcacheError(f"--label-smoothing {eps} must lie in [0, 1)")
    if eps == 0.0 or weight == 0.0:
        return fn

    def smoothed(s, t, y):
        out = fn(s, t, y)
        with torch.autocast(s.device.type, enabled=False):
            logp = F.log_softmax(s.float(), 1)
            if y.dtype.is_floating_point:  # mixed (Mixup/CutMix) label distributions
                ce = -(y.float() * logp).sum(1).mean()
            else:
                ce = -logp.gather(1, y[:, None]).mean()
            delta = eps * (-logp.mean(1).mean() - ce)
        out["loss"] = out["loss"] + weight * delta
        return out

    return smoothed


class ModelEma:
    """Weight EMA of the student (timm ModelEmaV3 with warmup): after update k the decay is
    min(decay, (1 + k) / (10 + k)), so short runs are not dominated by the initial weights.
    Buffers (BatchNorm statistics) are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998) -> None:
        if not 0.0 < decay < 1.0:
            raise KdcacheError(f"--ema-decay {decay} must lie in (0, 1)")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = float(decay), 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        cur = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(ema, cur, 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def reg_count(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float):
    """WSL's regularization-sample count (`distill.losses.regularization_samples`) as a 0-d
    tensor on the device, so counting never syncs the host; exact (an integer tensor)."""
    idx = labels[:, None]
    s, t = student.float(), teacher.float()
    ps1 = F.softmax(s, 1).gather(1, idx).squeeze(1)
    ps_t = F.softmax(s / T, 1).gather(1, idx).squeeze(1)
    pt_t = F.softmax(t / T, 1).gather(1, idx).squeeze(1)
    a = ps1 - 1.0
    b = T * (ps_t - pt_t) - a
    return (b.abs() > a.abs()).sum()


class DeviceSums:
    """Named running sums in one float64 vector on the device (float32 on MPS: no float64).

    `add` queues a few kernels and never syncs; `pull` is the single host sync. Counts stay
    exact: float64 holds integers up to 2**53."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.names: list[str] = []
        self.vec: torch.Tensor | None = None

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one step's values (terms may appear later, e.g. MrKD's teacher terms)."""
        new = [k for k in values if k not in self.names]
        if new:
            self.names += new
            if self.vec is not None:
                pad = torch.zeros(len(new), dtype=self.dtype, device=self.device)
                self.vec = torch.cat([self.vec, pad])
        if len(values) == len(self.names):
            parts = [values[k].detach().to(self.dtype) for k in self.names]
        else:
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            parts = [values[k].detach().to(self.dtype) if k in values else zero for k in self.names]
        v = torch.stack(parts)
        self.vec = v if self.vec is None else self.vec.add_(v)

    def pull(self) -> dict[str, float]:
        """Host copy of the sums: the one synchronizing call."""
        if self.vec is None:
            return {}
        return dict(zip(self.names, self.vec.cpu().tolist(), strict=True))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup of optimizer step `step` (0-based): (step+1)/warmup_steps, then 1."""
    if step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def epoch_lr(lr: float, first: int, end: int, warmup_steps: int) -> float:
    """The lr an epoch's optimizer steps `first..end-1` used on average, warm-up included: what
    metrics.jsonl and the lr panel show (the scheduler's lr alone is flat during warm-up)."""
    if end <= first or first >= warmup_steps:
        return lr
    return lr * sum(warmup_factor(s, warmup_steps) for s in range(first, end)) / (end - first)


def steps_per_epoch(items: int, batch_size: int, world_size: int, accum: int = 1) -> int:
    """Optimizer steps of one epoch (a last batch smaller than the world size is dropped)."""
    full, rest = divmod(items, batch_size)
    batches = full + (1 if rest >= world_size else 0)
    return max(1, math.ceil(batches / max(1, accum)))
