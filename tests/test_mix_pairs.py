"""Pair-mode Mixup/CutMix (data/pairs.py, the cache default): the seeded pairing, params that
stay batch-free and symmetric, each pre-mix view made once per pair in both stages, stage-2
plans that keep pairs side by side, and the --mixup-mode option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kdcache.cache.epoch import adjacent
from kdcache.cache.store import open_cache
from kdcache.data import pairs

from tests.clitools import cli
from tests.datatools import make_jpeg_folder

PRE = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear",
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
STRONG = {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.5, "mixup": 0.8, "cutmix": 1.0}


def test_pairing_is_a_seeded_matching_inside_groups_of_16():
    n, a = 37, 3  # groups 0-15, 16-31 and 32-36 (odd: one row left unmixed)
    p = pairs.partners(5, np.arange(n), a, n)
    for v in range(a):
        mate = p[:, v]
        paired = mate >= 0
        assert np.array_equal(mate[mate[paired]], np.arange(n)[paired])  # symmetric
        assert (mate[paired] // 16 == np.arange(n)[paired] // 16).all()  # same group
        assert (mate != np.arange(n)).all() and (~paired).sum() == 1 and not paired[32:].all()
    assert not np.array_equal(p[:, 0], p[:, 1])  # each view has its own pairing
    assert not np.array_equal(p, pairs.partners(6, np.arange(n), a, n))  # and each seed
    sub = np.array([33, 3, 20, 3])
    np.testing.assert_array_equal(pairs.partners(5, sub, a, n), p[sub])  # any batch


def test_adjacent_puts_partners_side_by_side():
    keys = np.array([10, 3, 7, 4, 8, 11, 5])  # pairs (3,4), (7,8), (10,11); 5 alone
    mate = np.array([11, 4, 8, 3, 7, 10, -1])
    order = adjacent(mate, keys)
    assert keys[order].tolist() == [10, 11, 3, 4, 7, 8, 5]
    one_way = np.array([11, 4, 8, 3, 7, 10, 3])  # 5 names 3, 3 names 4: 5 stays unpaired
    assert keys[adjacent(one_way, keys)].tolist() == [10, 11, 3, 4, 7, 8, 5]


@pytest.fixture(scope="module")
def jpeg_maker(tmp_path_factory):
    """An rrc-flip + RandAugment + erasing + Mixup/CutMix maker over JPEGs of several sizes
    (rrc boxes and CutMix need each row's own size)."""
    from kdcache.data import loader as L
    from kdcache.data.datasets import load_dataset

    root = make_jpeg_folder(tmp_path_factory.mktemp("jp") / "imgs", per_class=10)
    ds = load_dataset("imagefolder", root=str(root), split="train")
    policy = L.make_policy("rrc-flip", ds, {"preprocessing": PRE}, strong=dict(STRONG))
    order, _ = L.row_order(ds, 0, permute=True)
    return L.ViewMaker(ds, policy, rows=order), ds, policy, order


def _count_premix(policy, monkeypatch) -> list:
    calls: list = []
    one = policy._one
    monkeypatch.setattr(policy, "_one", lambda img, q: calls.append(1) or one(img, q))
    return calls


def test_pair_params_are_batch_free_symmetric_and_replay(jpeg_maker, monkeypatch):
    maker, ds, policy, order = jpeg_maker
    n, a, sd = len(ds), 3, policy.s_dim
    assert policy.pairs and n > 16
    calls = _count_premix(policy, monkeypatch)
    batch = maker.draw_rows(list(range(16)), 0, a, True)
    assert len(calls) == 16 * a  # stage 1: every pre-mix view once for both of its pairs
    for r in (0, 5, 15):
        views, params = maker.draw(int(order[r]), 0, a, True)  # drawn alone
        assert np.array_equal(params, batch[r][1]) and torch.equal(views, batch[r][0])
    p = np.stack([b[1] for b in batch])
    mixed = 0
    for r in range(16):
        for v in range(1, a):
            if p[r, v, sd] > 0:
                mixed += 1
                j = int(p[r, v, sd + 2])
                q = p[j, v]
                assert int(q[sd + 2]) == r and q[sd + 1] == p[r, v, sd + 1]  # one lam
                assert np.array_equal(q[sd + 3 : sd + 7], p[r, v, sd + 3 : sd + 7])  # one box
                assert np.array_equal(p[r, v, sd + 7 :], p[j, v, :sd])  # its own view
                want = policy.view(ds.load(int(order[r])), p[r, v], ds.load(int(order[j])))
                assert torch.equal(want, batch[r][0][v])
    assert mixed >= 16 and set(np.unique(p[:, 1:, sd])) >= {1.0, 2.0}
    assert (p[:, 0, sd] == 0).all()  # the identity view never mixes


def test_stage2_plan_keeps_pairs_adjacent_and_replays_each_premix_once(jpeg_maker, monkeypatch):
    from kdcache.data.loader import _Replay
    from kdcache.distill.batches import plan_epoch

    maker, ds, policy, order = jpeg_maker
    n, a, sd = len(ds), 3, policy.s_dim
    params = np.stack([v for _, v in maker.draw_rows(list(range(n)), 0, a, False)])

    def fn(r, v):
        return policy.mix_of(params[r, v])[0]

    plan = list(plan_epoch(n, a, 8, 1, 2, "one", 1, 16, fn))
    rows = np.concatenate([s for s, _ in plan])
    augs = np.concatenate([v for _, v in plan])
    assert sorted(rows.tolist()) == list(range(n))
    by_row = dict(zip(rows.tolist(), augs.tolist(), strict=True))
    assert all(by_row[r] == by_row[(r // 16) * 16] for r in range(n))  # one view per group
    split = 0
    for s, v in plan:
        for r, x in zip(s, v, strict=True):
            j = int(fn(np.array([r]), np.array([x]))[0])
            split += j >= 0 and j not in s.tolist()
    assert split <= 1  # an odd group's leftover may shift one pair across a batch edge
    calls = _count_premix(policy, monkeypatch)
    got = _Replay(maker).__getitems__(
        [(int(r), int(order[r]), params[r, x][None]) for r, x in zip(rows, augs, strict=True)]
    )
    assert len(calls) == n  # one pre-mix view per item: partners come from the batch
    for (r, views, _), x in list(zip(got, augs, strict=True))[:6]:
        p = params[r, x]
        j = int(p[sd + 2]) if p[sd] > 0 else None
        img = ds.load(int(order[r]))
        want = policy.view(img, p, None if j is None else ds.load(int(order[j])))
        assert torch.equal(views[0], want)


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("pc") / "c.zarr"
    cli("precompute", "--dataset", "digits", "--teacher", "resnet8", "--random-init", "0",
        "--max-samples", "40", "--num-augs", "3", "--chunk-samples", "16", "--aa",
        "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--out", out)  # fmt: skip
    return str(out)


def test_chunk_epoch_and_sampler_keep_pairs_adjacent(pair_cache):
    import kdcache
    from kdcache.cache.reader import iter_epoch

    ds = kdcache.CachedDataset(pair_cache)
    assert ds.mix_group == 16
    vp = ds.cache.view_params(np.arange(40))

    def fn(r, v):
        return ds.policy.mix_of(vp[r, v])[0]

    def adjacent_pairs(rows, augs) -> int:
        mates = fn(rows, augs)
        return sum(int(mates[i]) == rows[i + 1] for i in range(len(rows) - 1))

    with open_cache(pair_cache) as c:
        got = list(iter_epoch(c, 8, 0, 3, mix_group=16, partner_fn=fn))
    rows = np.concatenate([g[0] for g in got])
    augs = np.concatenate([g[1] for g in got])
    assert sorted(rows.tolist()) == list(range(40))
    on = (fn(rows, augs) >= 0).sum()
    assert on >= 20 and adjacent_pairs(rows, augs) == on // 2
    ds.set_epoch(3)
    sampler = kdcache.ChunkSampler(ds, seed=1)
    sampler.set_epoch(3)
    idx = np.array(list(sampler))
    views = np.array([ds.row_views(int(i))[1][0] for i in idx])
    on = (fn(idx, views) >= 0).sum()
    assert on >= 20 and adjacent_pairs(idx, views) == on // 2
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
    first = next(iter(loader))
    for k in range(8):  # a batch replays exactly the items read one by one
        one = ds[int(idx[k])]
        assert torch.equal(first["input"][k], one["input"])
        assert torch.equal(first["mix_label"][k], one["mix_label"])


def test_mixup_mode_option(pair_cache, tmp_path):
    assert "pair mode in groups of 16 rows" in cli("cache", "info", pair_cache).output
    out = tmp_path / "e.zarr"
    cli("precompute", "--dataset", "digits", "--teacher", "resnet8", "--random-init", "0",
        "--max-samples", "20", "--mixup", "0.8", "--mixup-mode", "elem", "--out", out)  # fmt: skip
    assert "elem mode, partner rows of 20" in cli("cache", "info", out).output
    res = cli("distill", "--dataset", "digits", "--student", "resnet8", "--max-samples", "20",
              "--mixup", "0.8", "--mixup-mode", "pair", "--out", tmp_path / "r",
              ok=False)  # fmt: skip
    last = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(last) == 1 and last[0].startswith("error: --mixup-mode")
    assert not (tmp_path / "r").exists()
