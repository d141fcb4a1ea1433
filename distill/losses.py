"""Distillation losses (DESIGN.md section 6), one pure function per method.

Each loss maps ``(student_logits (N,K), teacher_logits (N,K) | None, labels (N,))`` (or, for
``MIXED_LABEL_LOSSES``, λ-mixed label distributions (N,K) of Mixup/CutMix views) plus its
hyper-parameters to a dict: the scalar total under ``"loss"`` and its unweighted, detached terms
beside it (for logging). Adding a method = one function + one ``LOSSES`` entry + one test.
Inputs are upcast to at least float32 and computed with autocast off, so fp16 cached teacher
logits and bf16/fp16 student logits under AMP give the same numbers as fp32. Teacher logits are
targets: they are detached. Bad names and values raise ``ValueError`` (the CLI maps it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kdcache.distill.hparams import check_values, domain_of
from kdcache.distill.hparams import is_real as _real
from torch import Tensor

LossFn = Callable[[Tensor, "Tensor | None", Tensor], dict[str, Tensor]]


def _kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Per-element q·(log q − log p) from log-probabilities: finite even where q underflows."""
    return F.kl_div(log_p, log_q, reduction="none", log_target=True)


def _target_dist(labels: Tensor, k: int, c: float, like: Tensor) -> Tensor:
    """Log of the designed distribution: c on the label, (1−c)/(K−1) elsewhere."""
    log_q = torch.full_like(like, math.log((1.0 - c) / (k - 1)))
    return log_q.scatter(1, labels[:, None], math.log(c))


def _ce(s: Tensor, t: Tensor | None, y: Tensor) -> dict[str, Tensor]:
    """Plain cross-entropy: the no-distillation baseline."""
    ce = F.cross_entropy(s, y)
    return {"loss": ce, "ce": ce}


def _kd(s: Tensor, t: Tensor, y: Tensor, *, T: float, alpha: float, ce_weight: float):
    """Hinton KD as in RepDistiller/mdistiller: T² keeps soft-gradient scale independent of T."""
    ce = F.cross_entropy(s, y)
    kd = T * T * _kl(F.log_softmax(t / T, 1), F.log_softmax(s / T, 1)).sum(1).mean()
    return {"loss": ce_weight * ce + alpha * kd, "ce": ce, "kd": kd}


def _wsl(s: Tensor, t: Tensor, y: Tensor, *, T: float, alpha: float):
    """Weighted soft labels (Zhou et al., ICLR 2021). Paper: CIFAR T=4, alpha=2.25;
    ImageNet T=2, alpha=2.5. The weight compares student and teacher CE at T=1 on detached
    logits, so it only rescales each sample's soft loss and carries no gradient."""
    ce = F.cross_entropy(s, y)
    h = -(F.softmax(t / T, 1) * F.log_softmax(s / T, 1)).sum(1)
    with torch.no_grad():
        ce_s = F.cross_entropy(s.detach(), y, reduction="none")
        ce_t = F.cross_entropy(t.detach(), y, reduction="none")
        w = 1.0 - torch.exp(-ce_s / (ce_t + 1e-7))
    soft = T * T * (w * h).mean()
    return {"loss": ce + alpha * soft, "ce": ce, "soft": soft, "weight_mean": w.mean()}


def _lsr(s: Tensor, t: Tensor | None, y: Tensor, *, eps: float):
    """Label smoothing (Szegedy et al.): CE against (1−ε)·onehot + ε/K (uniform includes y)."""
    logp = F.log_softmax(s, 1)
    ce = -logp.gather(1, y[:, None]).squeeze(1)
    loss = ((1.0 - eps) * ce - eps * logp.mean(1)).mean()
    return {"loss": loss, "ce": ce.mean()}


def _tfkd_reg(s: Tensor, t: Tensor | None, y: Tensor, **hp: float):
    """Tf-KD_reg (Yuan et al.): KD from a hand-designed teacher p^d, softened as softmax(p^d/T).
    Official code: student at T=1, KLDivLoss's element-wise mean (1/(N·K)), no T²."""
    T, alpha, mult, c = hp["T"], hp["alpha"], hp["multiplier"], hp["correct_prob"]
    ce = F.cross_entropy(s, y)
    p_d = _target_dist(y, s.shape[1], c, s).exp()
    soft = mult * _kl(F.log_softmax(p_d / T, 1), F.log_softmax(s, 1)).mean()
    return {"loss": (1.0 - alpha) * ce + alpha * soft, "ce": ce, "soft": soft}


def _tfkd_self(s: Tensor, t: Tensor, y: Tensor, *, T: float, alpha: float, multiplier: float):
    """Tf-KD_self: KD from a pre-trained copy of the same architecture (official code:
    KLDivLoss element-wise mean 1/(N·K), times T² and a per-setting multiplier)."""
    ce = F.cross_entropy(s, y)
    kl = _kl(F.log_softmax(t / T, 1), F.log_softmax(s / T, 1)).mean()
    kd = T * T * multiplier * kl
    return {"loss": (1.0 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def _lsr_os_c(s: Tensor, y: Tensor, c: float, T: float, alpha: float) -> dict[str, Tensor]:
    """LsrKD / LSR-OS(-TC) (Wang et al.): batch-mean KL from the designed q to the student at T."""
    ce = F.cross_entropy(s, y)
    log_q = _target_dist(y, s.shape[1], c, s)
    soft = T * T * _kl(log_q, F.log_softmax(s / T, 1)).sum(1).mean()
    return {"loss": (1.0 - alpha) * ce + alpha * soft, "ce": ce, "soft": soft}


def _lsr_os(s: Tensor, t: Tensor | None, y: Tensor, *, T: float, alpha: float):
    """Output smoothing: uniform teacher (c = 1/K); at T=1 equals LSR(ε=alpha) − alpha·log K."""
    return _lsr_os_c(s, y, 1.0 / s.shape[1], T, alpha)


def _lsr_os_tc(s: Tensor, t: Tensor | None, y: Tensor, *, T: float, alpha: float, c: float):
    """Teacher correction: the uniform teacher with more mass (c > 1/K) on the true class."""
    k = s.shape[1]
    if not 1.0 / k < c < 1.0:
        raise ValueError(f"lsr-os-tc: c={c} must lie in (1/K, 1) = ({1.0 / k:.4g}, 1) for K={k}")
    return _lsr_os_c(s, y, c, T, alpha)


def knowledge_adjust(logits: Tensor, labels: Tensor) -> Tensor:
    """Knowledge Adjustment (MrKD journal version): where a historical copy ranks a wrong class
    first, swap its ground-truth logit with its arg-max logit, so the true class ranks first
    and the copy's other "dark knowledge" is kept. Rows already right are untouched."""
    top = logits.argmax(1)
    rows = (top != labels).nonzero().squeeze(1)
    out = logits.clone()
    if rows.numel():
        y, a = labels[rows], top[rows]
        out[rows, y] = logits[rows, a]
        out[rows, a] = logits[rows, y]
    return out


def _mrkd(s: Tensor, t: Tensor, y: Tensor, *, T: float, alpha: float, ce_weight: float, **_: Any):
    """Memory-replay KD: KD against the mean logits of the student's frozen historical copies
    (each Knowledge-Adjusted when ka). M, interval, warmup and ka belong to the teacher
    (`distill.teachers.MrKDTeacher`); before the first copy exists the loop trains plain CE."""
    return _kd(s, t, y, T=T, alpha=alpha, ce_weight=ce_weight)


@dataclass(frozen=True)
class LossDef:
    """A registered loss: its function, default hyper-parameters and what it consumes."""

    fn: Callable[..., dict[str, Tensor]]
    defaults: dict[str, Any]
    needs_teacher: bool  # the fn must be given teacher logits
    needs_cache: bool  # those logits come from a teacher cache (mrkd: from the loop instead)
    help: str = ""  # one line for `kdcache list losses`


_KD = {"T": 4.0, "alpha": 0.9, "ce_weight": 0.1}
_MRKD = {"T": 4.0, "alpha": 0.3, "ce_weight": 1.0}
_MRKD.update({"M": 2, "interval": None, "warmup": 0, "ka": True})
LOSSES: dict[str, LossDef] = {
    "ce": LossDef(_ce, {}, False, False, "cross-entropy with the labels (no teacher)"),
    "kd": LossDef(_kd, dict(_KD), True, True, "Hinton KD: ce_weight*CE + alpha*T^2*KL"),
    "wsl": LossDef(
        _wsl, {"T": 4.0, "alpha": 2.25}, True, True, "weighted soft labels (Zhou et al. 2021)"
    ),
    "lsr": LossDef(_lsr, {"eps": 0.1}, False, False, "label smoothing regularization"),
    "tfkd-reg": LossDef(
        _tfkd_reg,
        {"T": 20.0, "alpha": 0.1, "multiplier": 100.0, "correct_prob": 0.99},
        False,
        False,
        "Tf-KD with a designed teacher (0.99 on the label)",
    ),
    "tfkd-self": LossDef(
        _tfkd_self,
        {"T": 6.0, "alpha": 0.95, "multiplier": 50.0},
        True,
        True,
        "Tf-KD from a cached, fully trained copy of the student (README: no gain on digits)",
    ),  # fmt: skip
    "lsr-os": LossDef(
        _lsr_os, {"T": 4.0, "alpha": 0.1}, False, False, "output smoothing (uniform teacher)"
    ),
    "lsr-os-tc": LossDef(
        _lsr_os_tc,
        {"T": 4.0, "alpha": 0.1, "c": 0.2},
        False,
        False,
        "output smoothing with teacher correction (c on the label)",
    ),  # fmt: skip
    # MrKD defaults are a reconstruction (README "MrKD"): CE at full weight, copies refreshed at
    # every epoch end, Knowledge Adjustment on, KD only once the first copy exists.
    "mrkd": LossDef(_mrkd, dict(_MRKD), True, False, "KD from the student's own historical copies"),
}


def _lookup(name: str) -> LossDef:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# losses whose labels enter only through CE, which takes the λ-mixed ground-truth
# distributions of Mixup/CutMix views as well (labels (N, K) float)
MIXED_LABEL_LOSSES = ("ce", "kd", "wsl", "tfkd-self")


def loss_takes_mixed_labels(name: str) -> bool:
    """Whether the loss accepts (N, K) mixed label distributions (Mixup/CutMix views)."""
    _lookup(name)
    return name in MIXED_LABEL_LOSSES


def loss_needs_teacher(name: str) -> bool:
    """Whether the loss fn must be given teacher logits (mrkd: from the student's history)."""
    return _lookup(name).needs_teacher


def loss_needs_cache(name: str) -> bool:
    """Whether the teacher logits must come from a teacher cache."""
    return _lookup(name).needs_cache


def loss_defaults(name: str) -> dict[str, Any]:
    """A copy of the loss's default hyper-parameters."""
    return dict(_lookup(name).defaults)


def loss_hparams(name: str) -> list[dict[str, Any]]:
    """Each hyper-parameter of a loss as {name, default, domain} (for `list losses`)."""
    return [
        {"name": k, "default": v, "domain": domain_of(k, v).text}
        for k, v in _lookup(name).defaults.items()
    ]


def check_hparams(
    name: str, hparams: dict[str, Any], num_classes: int | None = None
) -> dict[str, Any]:
    """Resolve a loss's hyper-parameters (defaults + given) and check each against its domain
    (K-dependent ones, like lsr-os-tc's c > 1/K, once num_classes is known). Call it before a
    run writes anything; raises ValueError naming the value and what is expected."""
    return check_values(name, _lookup(name).defaults, hparams, num_classes)


def _prepare(s: Tensor, t: Tensor | None, y: Tensor, name: str, needs_teacher: bool):
    """Validate shapes; upcast to >= float32 (keeps float64 for gradcheck); detach the teacher."""
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"{name}: student logits must be (N, K>=2), got {tuple(s.shape)}")
    if y.dtype.is_floating_point and name in MIXED_LABEL_LOSSES:
        if y.shape != s.shape:
            raise ValueError(f"{name}: mixed labels must be (N, K)={tuple(s.shape)}")
        return _upcast(s, t, name, needs_teacher) + (y.to(torch.promote_types(s.dtype, y.dtype)),)
    if y.shape != (s.shape[0],) or y.dtype.is_floating_point:
        raise ValueError(f"{name}: labels must be integer (N,)={s.shape[0]}, got {tuple(y.shape)}")
    return _upcast(s, t, name, needs_teacher) + (y.long(),)


def _upcast(s: Tensor, t: Tensor | None, name: str, needs_teacher: bool):
    dtype = torch.promote_types(s.dtype, torch.float32)
    if needs_teacher:
        if t is None:
            raise ValueError(f"{name}: needs teacher logits, got None")
        if t.shape != s.shape:
            raise ValueError(f"{name}: teacher {tuple(t.shape)} != student {tuple(s.shape)}")
        t = t.detach().to(dtype)
    return s.to(dtype), t


def get_loss(name: str, **hparams: Any) -> LossFn:
    """Bind a registered loss to its hyper-parameters (defaults for the ones not given)."""
    d = _lookup(name)
    hp = check_hparams(name, hparams)

    def loss_fn(student: Tensor, teacher: Tensor | None, labels: Tensor) -> dict[str, Tensor]:
        s, t, y = _prepare(student, teacher, labels, name, d.needs_teacher)
        with torch.autocast(device_type=s.device.type, enabled=False):
            out = d.fn(s, t, y, **hp)
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}

    loss_fn.__name__ = f"loss_{name.replace('-', '_')}"
    return loss_fn


def combine_teachers(logits: list[Tensor], mode: str = "mean-logits", T: float = 1.0) -> Tensor:
    """Ensemble several teachers' logits on the same views into one set of logits.

    ``mean-logits``: plain mean. ``mean-probs``: T·log mean_i softmax(z_i/T), i.e. logits whose
    softmax at temperature T is the mean of the members' softened probabilities (T=1: log of
    the mean softmax).
    """
    if not logits:
        raise ValueError("combine_teachers: need at least one teacher's logits")
    if any(z.shape != logits[0].shape for z in logits):
        raise ValueError(f"combine_teachers: shapes differ: {[tuple(z.shape) for z in logits]}")
    if not (_real(T) and T > 0):
        raise ValueError(f"combine_teachers: T={T!r}, expected a number > 0")
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    z = torch.stack([x.to(dtype) for x in logits])
    if mode == "mean-logits":
        return z.mean(0)
    if mode == "mean-probs":
        return T * (torch.logsumexp(F.log_softmax(z / T, -1), 0) - math.log(len(logits)))
    raise ValueError(f"combine_teachers: unknown mode {mode!r}; known: mean-logits, mean-probs")


def teacher_view_mean(logits: Tensor) -> Tensor:
    """(B, A, C) logits over A cached views -> (B, C) mean (``--teacher-view mean``, TTA)."""
    if logits.ndim != 3:
        raise ValueError(f"teacher_view_mean: expected (B, A, C), got {tuple(logits.shape)}")
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).mean(1)


@torch.no_grad()
def regularization_samples(
    student: Tensor, teacher: Tensor, labels: Tensor, T: float
) -> dict[str, int | float]:
    """WSL §3.2 diagnostic on the true-class logit: a = ∂CE/∂z_y = p^s_{y,1} − 1 (bias),
    b = ∂(L_kd − CE)/∂z_y = T·(p^s_{y,T} − p^t_{y,T}) − (p^s_{y,1} − 1) (variance); a sample
    with |b| > |a| is a regularization sample."""
    if not (_real(T) and T > 0):
        raise ValueError(f"regularization_samples: T={T!r}, expected a number > 0")
    s, t, y = _prepare(student, teacher, labels, "regularization_samples", True)
    idx = y[:, None]
    ps1 = F.softmax(s, 1).gather(1, idx).squeeze(1)
    psT = F.softmax(s / T, 1).gather(1, idx).squeeze(1)
    ptT = F.softmax(t / T, 1).gather(1, idx).squeeze(1)
    a = ps1 - 1.0
    b = T * (psT - ptT) - a
    n = int(y.shape[0])
    count = int((b.abs() > a.abs()).sum())
    return {"count": count, "fraction": count / n if n else 0.0, "n": n}
