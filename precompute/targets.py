"""Per-token teacher targets, computed ON THE DEVICE from the logits of real positions:
fp32 log_softmax, then top-k (+ top-p, + exact tail log-mass) or seeded sampled draws. Only
(n, K)-sized results travel to the host, never the full-vocabulary logits."""

from __future__ import annotations

import numpy as np
import torch
from kdcache.cache.dtypes import GOLDEN, mix64


def topk_targets(
    logits: torch.Tensor, k: int, top_p: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs (..., K) sorted descending, ids (..., K), tail (...)) from logits (..., V).

    Three reading passes over the vocabulary, no full-size write: lse = logsumexp(z),
    top-k of z (log_softmax is z - lse, same order), then the kept ids are set to -inf IN
    PLACE (the caller's logits are consumed) and tail = logsumexp(rest) - lse: the exact log
    of the mass outside the kept ids (-inf if none). With top_p, entries past the nucleus
    are dropped (id 0, logprob -inf) into the tail."""
    z = logits.float()  # fp32 (a copy only when the forward ran in bf16)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    k = min(k, z.shape[-1])
    vals, ids = z.topk(k, dim=-1, sorted=True)
    vals = vals - lse
    z.scatter_(-1, ids, float("-inf"))
    tail = (torch.logsumexp(z, dim=-1, keepdim=True) - lse).squeeze(-1)
    if top_p is not None:
        p = vals.exp()
        before = torch.cumsum(p, dim=-1) - p  # mass of the better entries
        drop = before >= top_p
        drop[..., 0] = False
        dropped = torch.where(drop, vals, torch.full_like(vals, float("-inf")))
        tail = torch.logaddexp(tail, torch.logsumexp(dropped, dim=-1))
        vals = vals.masked_fill(drop, float("-inf"))
        ids = ids.masked_fill(drop, 0)
    return vals, ids, tail


def draw_uniforms(seed: int, rows: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """(n, K) float64 uniforms in [0, 1), a function of (seed, row, t, j) only."""
    with np.errstate(over="ignore"):
        base = mix64(np.uint64(seed & (2**64 - 1)) * GOLDEN + mix64(rows.astype(np.uint64)))
        base = mix64(base ^ (pos.astype(np.uint64) * GOLDEN))
        h = mix64(base[:, None] + (np.arange(1, k + 1, dtype=np.uint64) * GOLDEN)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sampled_targets(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(n, K) drawn ids: inverse-CDF draws of softmax(logits) at the given uniforms."""
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = u.to(cdf.dtype) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target.contiguous(), right=True)
    return ids.clamp_(max=logits.shape[-1] - 1)


def distinct_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drawn ids (n, K) -> distinct ids ascending (padded with 0) and their counts (sum K)."""
    s = np.sort(draws, axis=1)
    n, k = s.shape
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = np.cumsum(new, axis=1) - 1
    rows = np.repeat(np.arange(n), k)
    ids = np.zeros((n, k), np.int64)
    counts = np.zeros((n, k), np.int64)
    ids[rows, slot.ravel()] = s.ravel()
    np.add.at(counts, (rows, slot.ravel()), 1)
    return ids, counts


def kl_to_dense(
    logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, mode: str, k: int
) -> torch.Tensor:
    """Per-token KL between the dense teacher p and the stored targets q, summed.

    topk: KL(p || q), q = stored probs on their ids + the tail mass spread evenly over the
    other ids (what the stored numbers determine); sampled: KL(q || p), q = counts / K."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if mode == "topk":
        p = logp.exp()
        kept = torch.zeros_like(p, dtype=torch.bool)
        kept.scatter_(-1, ids, values > float("-inf"))
        n_rest = (~kept).sum(-1).clamp(min=1)
        rest_mass = (p * ~kept).sum(-1).clamp(min=1e-30)
        q_rest = torch.log(rest_mass / n_rest)[:, None]
        logq = torch.where(kept, logp, q_rest.expand_as(logp))
        return (p * (logp - logq)).sum(-1).clamp(min=0).sum()
    q = values / k
    lp = logp.gather(-1, ids)
    term = torch.where(q > 0, q * (torch.log(q.clamp(min=1e-30)) - lp), torch.zeros_like(q))
    return term.sum()
