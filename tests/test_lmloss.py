"""Token-level KD losses (distill/lmloss.py) against dense references computed here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kdcache.distill.lmloss import SparseTargets, get_lm_loss, lm_hparams, sparse_kl


def _logits(n: int = 6, v: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def _topk(t: torch.Tensor, k: int) -> SparseTargets:
    lp = F.log_softmax(t.double(), 1)
    vals, ids = lp.topk(k, 1)
    tail = torch.log1p(-vals.exp().sum(1).clamp(max=1.0))
    if k == t.shape[1]:
        tail = torch.full_like(tail, -math.inf)
    return SparseTargets("topk", ids, vals.float(), tail.float())


def _dense_kl(t: torch.Tensor, s: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    return (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_topk_equal_to_vocab_is_the_dense_kl_and_gradient(T):
    s, t = _logits()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    sparse = sparse_kl(s1, _topk(t, t.shape[1]), T)
    dense = _dense_kl(t, s2, T)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    sparse.sum().backward()
    dense.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)


def test_topk_is_the_kl_of_the_k_plus_tail_buckets():
    s, t = _logits(n=4, v=9, seed=1)
    k = 3
    got = sparse_kl(s, _topk(t, k))
    pt, ps = F.softmax(t.double(), 1), F.softmax(s.double(), 1)
    for i in range(s.shape[0]):
        ids = pt[i].topk(k).indices
        rest = torch.ones(9, dtype=torch.bool)
        rest[ids] = False
        p = torch.cat([pt[i, ids], pt[i, rest].sum()[None]])
        q = torch.cat([ps[i, ids], ps[i, rest].sum()[None]])
        want = float((p * (p.log() - q.log())).sum())
        assert float(got[i]) == pytest.approx(want, abs=1e-5)
        assert want < float(_dense_kl(t[i : i + 1], s[i : i + 1])[0]) + 1e-9  # a lower bound


def test_top_p_padding_entries_do_not_count():
    s, t = _logits(n=5, v=10, seed=2)
    full = _topk(t, 4)
    padded = SparseTargets(
        "topk",
        torch.cat([full.ids[:, :2], torch.zeros(5, 2, dtype=torch.long)], 1),
        torch.cat([full.values[:, :2], torch.full((5, 2), -math.inf)], 1),
        torch.log1p(-full.values[:, :2].exp().sum(1)),
    )
    torch.testing.assert_close(sparse_kl(s, padded), sparse_kl(s, _topk(t, 2)))
    assert torch.isfinite(sparse_kl(s, padded)).all()


def test_sampled_targets_are_counts_over_k_and_unbiased_for_the_cross_entropy():
    s, t = _logits(n=3, v=8, seed=3)
    ids = torch.tensor([[1, 4, 0], [2, 0, 0], [7, 5, 3]])
    counts = torch.tensor([[3.0, 1.0, 0.0], [4.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    got = sparse_kl(s, SparseTargets("sampled", ids, counts))
    ls = F.log_softmax(s, 1)
    for i in range(3):
        w = counts[i] / 4
        keep = w > 0
        want = (w[keep] * (w[keep].log() - ls[i, ids[i][keep]])).sum()
        assert float(got[i]) == pytest.approx(float(want), abs=1e-6)
    # E[-sum (c/K) log q] over the teacher's draws is H(p, q): one row, many seeded draws
    g = torch.Generator().manual_seed(0)
    p = F.softmax(t[:1], 1).expand(4000, -1)
    draws = torch.multinomial(p, 8, replacement=True, generator=g)
    cnt = torch.zeros(4000, 8).scatter_add_(1, draws, torch.ones(4000, 8))
    sid = torch.arange(8).expand(4000, -1)
    targets = SparseTargets("sampled", sid, cnt)
    est = sparse_kl(s[:1].expand(4000, -1), targets)
    w = cnt / 8
    ent = -(torch.where(w > 0, w * w.log(), torch.zeros_like(w))).sum(1)
    ce_est = float((est + ent).mean())
    ce_true = float(-(F.softmax(t[:1], 1) * F.log_softmax(s[:1], 1)).sum())
    assert ce_est == pytest.approx(ce_true, rel=0.02)


def test_kd_total_mixes_ce_and_kl_by_alpha_at_t():
    s, t = _logits(n=6, v=11, seed=4)
    y = torch.tensor([0, 3, 5, 7, 9, 10])
    targets = _topk(t, 4)
    out = get_lm_loss("kd", T=2.0, alpha=0.3)(s.clone().requires_grad_(), y, targets)
    ce = F.cross_entropy(s, y)
    kd = sparse_kl(s, targets, 2.0).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(0.7 * ce + 0.3 * 4.0 * kd), rel=1e-6)
    assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-6)
    assert not out["kd"].requires_grad and out["loss"].requires_grad
    assert float(get_lm_loss("ce")(s, y)["loss"]) == pytest.approx(float(ce), rel=1e-6)


def test_bad_hparams_and_missing_targets_are_refused():
    with pytest.raises(ValueError, match="alpha=1.5"):
        lm_hparams("kd", {"alpha": 1.5})
    with pytest.raises(ValueError, match="T=0"):
        lm_hparams("kd", {"T": 0})
    with pytest.raises(ValueError, match="unknown hyper-parameter 'eps'"):
        lm_hparams("kd", {"eps": 0.1})
    with pytest.raises(ValueError, match="not a language-model loss"):
        get_lm_loss("wsl")
    s, _ = _logits()
    with pytest.raises(ValueError, match="needs the teacher"):
        get_lm_loss("kd")(s, torch.zeros(6, dtype=torch.long), None)
