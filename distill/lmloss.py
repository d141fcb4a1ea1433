"""Token-level distillation losses for causal-LM students (issue 19, stage 2).

Every loss maps ``(student_logits (N, V), labels (N,), teacher: SparseTargets | None)`` — one
row per token the student is trained on (padding, the last position and masked-out tokens are
removed by the caller) — to a dict: the scalar total under ``"loss"`` and detached terms beside
it. Token mean throughout (the mean over the N kept tokens), as in Megatron-LM and TRL.

Targets come from a token cache, never a dense teacher:

* **top-k** (Megatron-LM / MaxText's sparse forward KL): the teacher's K largest log-probs
  ``lp`` on ids ``ids`` plus the tail log-mass ``tail = log(1 - sum exp(lp))``. The teacher is
  the (K+1)-bucket distribution (K ids + "everything else"); the student's buckets are its
  softmax on those ids and its own mass outside them, so
  ``KL = sum_k p_k (lp_k - log q_k) + p_tail (tail - log q_tail)``. With K = V the tail is empty
  and this is the dense KL exactly; for K < V it is the KL between the two distributions
  coarsened to K+1 buckets (a lower bound of the dense KL).
* **sampled** (Sparse Logit Sampling, Anshumann et al. 2025): K draws from the teacher; the
  targets are counts/K on the drawn ids, and ``-sum_k (c_k/K) log q_k`` is an unbiased
  estimate of the cross-entropy H(p, q) (hence of the KL's gradient). ``kd`` reports
  KL(counts/K ‖ q) = that CE minus the entropy of counts/K (>= 0).

Temperature. The cache stores the teacher at T = 1, so the targets are exact at T = 1 only.
At T != 1 the student is softened exactly (``log_softmax(z/T)``) and the teacher is
renormalised over what is stored: top-k buckets ``softmax([lp_1..lp_K, tail] / T)`` (the tail
treated as one pseudo-token: its true mass at T depends on how it is spread, which the cache
does not know), sampled targets ``softmax(log(c/K) / T)`` over the drawn ids. Both are
approximations; the KD term is multiplied by T² (Hinton) to keep its gradient scale.

The total is ``(1 - alpha) * CE + alpha * T² * KD`` where CE is the cross-entropy of the
student at T = 1 with the data tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SparseTargets:
    """The teacher's stored distribution for N tokens: ``mode`` "topk" (values = log-probs,
    ``tail`` = log-mass outside the ids) or "sampled" (values = counts, tail None)."""

    mode: str
    ids: Tensor  # (N, K) int64
    values: Tensor  # (N, K) float32: log-probs (-inf = padding) or counts (0 = padding)
    tail: Tensor | None = None  # (N,) float32, -inf when the ids hold all the mass

    def to(self, device: torch.device) -> SparseTargets:
        tail = None if self.tail is None else self.tail.to(device, non_blocking=True)
        return SparseTargets(
            self.mode,
            self.ids.to(device, non_blocking=True),
            self.values.to(device, non_blocking=True),
            tail,
        )

    def select(self, idx: Tensor) -> SparseTargets:
        """The targets of rows ``idx`` (a boolean mask or indices)."""
        tail = None if self.tail is None else self.tail[idx]
        return SparseTargets(self.mode, self.ids[idx], self.values[idx], tail)


def _xlogy_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-element p·(log p − log q); 0 where p = 0 (log p = −inf), even if log q = −inf."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return p * diff


def _support_mask(ids: Tensor, valid: Tensor, vocab: int) -> Tensor:
    """(N, V) bool: the ids a row stores (padding entries, ``valid`` False, are not counted)."""
    hits = torch.zeros(ids.shape[0], vocab, dtype=torch.int32, device=ids.device)
    hits.scatter_add_(1, ids, valid.to(torch.int32))
    return hits > 0


def sparse_kl(s: Tensor, t: SparseTargets, T: float = 1.0) -> Tensor:
    """Per-token forward KL(teacher ‖ student) at temperature T over the stored support
    (+ tail for top-k, see the module docstring); (N,) float."""
    log_qs = F.log_softmax(s / T, dim=1)
    if t.mode == "topk":
        lp = t.values
        valid = torch.isfinite(lp)
        tail = t.tail if t.tail is not None else torch.full_like(lp[:, 0], -math.inf)
        q_ids = log_qs.gather(1, t.ids)
        # the student's mass outside the stored ids, exactly (not 1 - sum, which cancels); a
        # finite fill keeps the gradient finite on rows whose ids cover the whole vocabulary
        support = _support_mask(t.ids, valid, s.shape[1])
        q_tail = torch.logsumexp(log_qs.masked_fill(support, -1e30), dim=1)
        full = support.all(1)  # no tail bucket: rounding of stored values must not open one
        tail = torch.where(full, torch.full_like(tail, -math.inf), tail)
        q_tail = torch.where(full, torch.zeros_like(q_tail), q_tail)
        # renormalised over the K+1 buckets (identity at T = 1 up to the storage rounding)
        teacher = F.log_softmax(torch.cat([lp, tail[:, None]], 1) / T, dim=1)
        student = torch.cat([q_ids, q_tail[:, None]], 1)
        return _xlogy_kl(teacher, student).sum(1)
    if t.mode == "sampled":
        log_c = torch.log(t.values.clamp_min(0))  # count 0 (padding) -> -inf -> weight 0
        target = F.log_softmax(log_c if T == 1.0 else log_c / T, dim=1)
        return _xlogy_kl(target, log_qs.gather(1, t.ids)).sum(1)
    raise ValueError(f"unknown sparse target mode {t.mode!r}; expected topk or sampled")


def _check(s: Tensor, y: Tensor, t: SparseTargets | None, needs_teacher: bool, name: str):
    if s.ndim != 2 or y.shape != (s.shape[0],):
        raise ValueError(f"{name}: expected logits (N, V) and labels (N,), got "
                         f"{tuple(s.shape)} and {tuple(y.shape)}")  # fmt: skip
    if needs_teacher:
        if t is None:
            raise ValueError(f"{name}: needs the teacher's stored targets (a token cache)")
        if t.ids.shape[0] != s.shape[0] or t.values.shape != t.ids.shape:
            raise ValueError(f"{name}: targets {tuple(t.ids.shape)} do not match {s.shape[0]} "
                             "tokens")  # fmt: skip
    return s.float(), y.long()


def _lm_ce(s: Tensor, y: Tensor, t: SparseTargets | None) -> dict[str, Tensor]:
    """Next-token cross-entropy on the data: plain language-model training."""
    ce = F.cross_entropy(s, y)
    return {"loss": ce, "ce": ce}


def _lm_kd(s: Tensor, y: Tensor, t: SparseTargets, *, T: float, alpha: float):
    """(1 − alpha)·CE + alpha·T²·KL over the stored targets (sparse KL or sampled estimator)."""
    ce = F.cross_entropy(s, y)
    kd = sparse_kl(s, t, T).mean()
    return {"loss": (1.0 - alpha) * ce + alpha * T * T * kd, "ce": ce, "kd": kd}


@dataclass(frozen=True)
class LMLossDef:
    fn: Callable[..., dict[str, Tensor]]
    defaults: dict[str, Any]
    needs_teacher: bool
    help: str = ""


LM_LOSSES: dict[str, LMLossDef] = {
    "ce": LMLossDef(_lm_ce, {}, False, "next-token cross-entropy (no teacher)"),
    "kd": LMLossDef(
        _lm_kd,
        {"T": 1.0, "alpha": 0.5},
        True,
        "(1-alpha)*CE + alpha*T^2*KL over the cached top-k (+tail) or sampled targets",
    ),
}


def lm_loss_needs_teacher(name: str) -> bool:
    return _lookup(name).needs_teacher


def _lookup(name: str) -> LMLossDef:
    if name not in LM_LOSSES:
        raise ValueError(
            f"--loss {name!r} is not a language-model loss; expected one of "
            f"{', '.join(sorted(LM_LOSSES))}"
        )
    return LM_LOSSES[name]


def lm_hparams(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """Defaults + given, each checked (T > 0, alpha in [0, 1]); unknown names refused."""
    d = _lookup(name)
    unknown = sorted(set(hparams) - set(d.defaults))
    if unknown:
        known = ", ".join(d.defaults) or "none"
        raise ValueError(f"--loss {name}: unknown hyper-parameter {unknown[0]!r}; known: {known}")
    hp = {**d.defaults, **hparams}
    for k, v in hp.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if k == "T" and not (ok and v > 0):
            raise ValueError(f"--loss {name}: T={v!r}, expected a number > 0")
        if k == "alpha" and not (ok and 0.0 <= v <= 1.0):
            raise ValueError(f"--loss {name}: alpha={v!r}, expected a number in [0, 1]")
    return {k: float(v) for k, v in hp.items()}


def get_lm_loss(name: str, **hparams: Any):
    """Bind a language-model loss to its hyper-parameters: ``fn(logits, labels, targets)``."""
    d = _lookup(name)
    hp = lm_hparams(name, hparams)

    def loss_fn(s: Tensor, y: Tensor, t: SparseTargets | None = None) -> dict[str, Tensor]:
        s, y = _check(s, y, t, d.needs_teacher, name)
        with torch.autocast(device_type=s.device.type, enabled=False):
            out = d.fn(s, y, t, **hp)
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}

    loss_fn.__name__ = f"lm_loss_{name}"
    return loss_fn
