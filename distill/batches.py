"""Stage 2's batches: plan (row, view) batches of an epoch, replay the views, attach the labels
and the cached teacher logits.

The global batch order depends only on (seed, epoch), never on the world size: each torchrun
rank takes every world_size-th row of a global batch, so DDP sees the same samples per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data.loader import ReplayLoader, ViewMaker, batched_views, use_batched
from kdcache.distill.feed import pin_batch, prefetch


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=(int(seed) << 32) + int(epoch) + 1))


def views_per_sample(views) -> int:
    """``--views``: one (1), all (0: every cached view, shuffled) or K (K views of one
    decoded sample per step, FKD's multi-crop trick)."""
    if views in ("one", "all"):
        return 1 if views == "one" else 0
    try:
        k = int(views)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise KdcacheError(f"--views {views!r}: expected one, all or a positive integer K")
    return k


def plan_epoch(
    n: int, num_augs: int, batch_size: int, seed: int, epoch: int, views: str, world_size: int = 1,
    mix_group: int = 0, partner_fn=None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Global (samples, augs) batches: one seeded view per sample, every cached view, or K
    distinct views per sample kept adjacent (one decode; a batch holds batch_size // K
    samples). Without a cache (num_augs 1) aug k means the k-th fresh draw. A pair-mode
    Mixup cache (``mix_group``, ``partner_fn``; data/pairs.py): "one" picks the view per
    group of rows, and the two views of a pair are kept adjacent (one pre-mix view each)."""
    from kdcache.cache.epoch import pair_order
    from kdcache.cache.reader import choose_augs

    rng = _rng(seed, epoch)
    k = views_per_sample(views)
    if k > 1:
        if 1 < num_augs < k:
            raise KdcacheError(f"--views {k} needs >= {k} cached views; the cache has {num_augs}")
        samples = rng.permutation(n)
        start = choose_augs(seed, epoch, samples, num_augs) if num_augs > 1 else samples * 0
        augs = ((start[:, None] + np.arange(k)) % max(num_augs, k)).reshape(-1)
        samples = np.repeat(samples, k)
        batch_size = max(1, batch_size // k) * k
        world_size *= k
    elif views == "all":
        pairs = rng.permutation(n * num_augs)
        samples, augs = pairs // num_augs, pairs % num_augs
    else:
        samples = rng.permutation(n)
        by = samples // mix_group if mix_group else samples
        augs = choose_augs(seed, epoch, by, num_augs) if num_augs > 1 else samples * 0
    if k <= 1 and partner_fn is not None:
        keep = pair_order(samples, augs, partner_fn, num_augs)
        samples, augs = samples[keep], augs[keep]
    for lo in range(0, len(samples), batch_size):
        s, a = samples[lo : lo + batch_size], augs[lo : lo + batch_size]
        if len(s) >= world_size:  # every rank must get a row, or DDP would hang
            yield s.astype(np.int64), a.astype(np.int64)


class BatchMaker:
    """Turns planned (rows, augs) into replayed views, labels and teacher logits.

    Rows are cache rows; ``teacher.rows`` maps them to dataset samples (a cache may store its
    rows in a permuted order; without a cache row == sample). In-RAM images with a batched
    policy are replayed in this thread; every other source goes through the worker processes
    of a ``ReplayLoader`` (``workers``), one decode per sample for all of its views.
    """

    def __init__(
        self, dataset, policy, teacher=None, seed: int = 0, rank: int = 0, world_size: int = 1,
        workers: int = 0, pin: bool = False,
    ) -> None:  # fmt: skip
        self.dataset, self.policy, self.teacher = dataset, policy, teacher
        self.seed, self.rank, self.world = seed, rank, world_size
        rows = getattr(teacher, "rows", None)
        self.rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, np.int64)
        self.labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64)[self.rows])
        self.cached = teacher is not None and hasattr(teacher, "params")
        self.batched = use_batched(dataset, policy)
        self.workers, self.pin = workers, pin
        self.group = 1  # views per sample kept together (--views K)
        self.mix_group, self.partner_fn = 0, None
        if self.cached and getattr(policy, "pairs", False):  # pair-mode Mixup/CutMix cache
            self.mix_group = int(policy.strong["mix_group"])
            vp = teacher.view_params
            self.partner_fn = lambda r, a: policy.partners_in(vp, r, a)
        self._loader: ReplayLoader | None = None

    def _plan(self, samples, augs, epoch, t_logits=None, sliced: bool = False) -> dict:
        """Everything of a batch but its views (made here or in a worker)."""
        from kdcache.data.views import view_params_for

        if not sliced:  # rank r takes every world-th sample (with all of its views)
            g = self.group
            sl = np.arange(len(samples)).reshape(-1, g)[self.rank :: self.world].reshape(-1)
            samples, augs = samples[sl], augs[sl]
            t_logits = None if t_logits is None else t_logits[sl]
        params = None
        if self.cached:
            params = self.teacher.params(samples, augs)
        elif not self.policy.needs_size:  # no cache: fresh seeded params per (seed, epoch)
            seed = self.seed * 100_003 + epoch
            fresh = view_params_for(self.policy, seed, self.rows[samples], self.group, False)
            params = fresh[np.arange(len(samples)), augs]
        t = None
        if t_logits is not None:
            t = torch.from_numpy(np.ascontiguousarray(t_logits))
        elif self.cached and not self.teacher.needs_views and self.teacher.chunked is None:
            t = self.teacher.logits(samples, augs)
        return {
            "samples": samples,
            "augs": augs,
            "params": params,
            "labels": self.labels[torch.from_numpy(samples)],
            "teacher": t,
            "epoch": epoch,
        }

    def __call__(
        self, samples: np.ndarray, augs: np.ndarray, epoch: int, t_logits: np.ndarray | None = None,
        sliced: bool = False,
    ) -> dict:  # fmt: skip
        """One batch made in this thread (the in-RAM batched path, and tests)."""
        b = self._plan(samples, augs, epoch, t_logits, sliced)
        if self.batched:
            b["views"] = batched_views(
                self.dataset, self.policy, self.rows[b["samples"]], b.pop("params")
            )
            return b
        return next(self.stream(iter([b])))

    def _items(self, b: dict) -> list:
        """One loader item per run of adjacent views of one row (one decode for all of them):
        (row, sample, params (k, P)) or a fresh draw of those augs."""
        rows, augs, params = b["samples"], b.get("augs"), b["params"]
        cut = np.flatnonzero(np.diff(rows)) + 1
        items = []
        for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(rows)], strict=True):
            r = int(rows[lo])
            if params is None:
                seed = self.seed * 100_003 + b["epoch"]
                draw = ("draw", seed, tuple(int(a) for a in augs[lo:hi]), self.group)
                items.append((r, int(self.rows[r]), draw))
            else:
                items.append((r, int(self.rows[r]), params[lo:hi]))
        return items

    def stream(self, plans) -> Iterator[dict]:
        """Views of planned batches through the worker processes (same order, same bytes)."""
        if self._loader is None:
            collate = getattr(self.dataset, "collate", None)
            maker = ViewMaker(self.dataset, self.policy, collate, rows=self.rows)
            self._loader = ReplayLoader(maker, self.workers, self.pin)
        for batch, b in self._loader.run((self._items(b), b) for b in plans):
            b.pop("params")
            b["views"] = batch["views"]
            if getattr(self.policy, "mixes", False):  # Mixup/CutMix: the partner's label and λ
                rows, lam = self.policy.mix_of(batch["params"])
                b["mix_labels"] = self.labels[torch.from_numpy(np.maximum(rows, 0))]
                b["mix_lam"] = torch.from_numpy(lam)
            yield b


def epoch_batches(
    make: BatchMaker,
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    views: str,
    depth: int,
    pin: bool = False,
):
    """All batches of one epoch, from the RAM plan or the chunk-aware cache iterator. In
    chunk-aware mode each torchrun rank reads only its share of the chunks."""
    t = make.teacher
    make.group = max(1, views_per_sample(views))
    if t is not None and getattr(t, "chunked", None) is not None:
        from kdcache.cache.reader import iter_epoch

        if 1 < t.num_augs < make.group:
            raise KdcacheError(
                f"--views {make.group} needs >= {make.group} cached views; the cache has "
                f"{t.num_augs}"
            )
        mode = "all" if views == "all" else "random"
        plans = (
            make._plan(s, a, epoch, lg, sliced=True)
            for s, a, lg in iter_epoch(
                t.chunked,
                batch_size=max(1, batch_size // make.world),
                seed=seed,
                epoch=epoch,
                aug_mode=mode,
                rank=make.rank,
                world_size=make.world,
                drop_last=make.world > 1,  # the same number of steps on every rank
                group=make.group,
                mix_group=make.mix_group,
                partner_fn=make.partner_fn,
            )
        )
    else:
        num_augs = t.num_augs if make.cached else 1
        mixing = (make.mix_group, make.partner_fn)
        plans = (
            make._plan(s, a, epoch)
            for s, a in plan_epoch(n, num_augs, batch_size, seed, epoch, views, make.world, *mixing)
        )
    if not make.batched:
        return make.stream(plans)
    it = (_made(make, b) for b in plans)
    if pin and depth > 0:
        it = (pin_batch(b) for b in it)
    return prefetch(it, depth)


def _made(make: BatchMaker, b: dict) -> dict:
    b["views"] = batched_views(make.dataset, make.policy, make.rows[b["samples"]], b.pop("params"))
    return b


def eval_batches(
    dataset, policy, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0
) -> Iterator[tuple[np.ndarray, object]]:
    """(samples, views) of the eval (identity) view of this rank's share of `dataset`, made
    in this thread (in-RAM data) or by the loader's worker processes (streamed sources)."""
    idx = np.arange(rank, len(dataset), world_size, dtype=np.int64)
    policy = getattr(policy, "base", policy)  # strong policies: the base's eval view, same pixels
    ident = np.asarray(policy.identity_params(), dtype=np.float32)
    make = BatchMaker(dataset, policy, workers=workers)
    plans = (
        {"samples": s, "params": np.broadcast_to(ident, (len(s), len(ident))), "epoch": 0}
        for s in (idx[lo : lo + batch_size] for lo in range(0, len(idx), batch_size))
    )
    for b in (_made(make, b) for b in plans) if make.batched else make.stream(plans):
        yield b["samples"], b["views"]
