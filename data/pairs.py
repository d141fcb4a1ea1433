"""Batch-free Mixup/CutMix in timm's *pair* mode (``--mixup-mode pair``, the default for
caches): cache rows fall in groups of ``GROUP`` consecutive rows (row // GROUP; rows are a
seeded permutation of the samples, so a group is a random set of samples); for each view
index a, a seeded permutation of the group pairs its rows two by two. Rows i and j of a
pair mix each other's view a, with one lam (and CutMix box), as timm's ``Mixup(mode="pair")``
mixes x[i] with x[n-1-i]: view (i, a) = mix(pre-mix (i, a), pre-mix (j, a)), view (j, a) =
mix(pre-mix (j, a), pre-mix (i, a)). A group of odd size leaves one row unmixed.

Why: each pre-mix view is then made once for both members of its pair (stage 1 makes all
of a group's views together; stage 2 keeps pairs adjacent in a batch), where elem mode makes
a partner's whole view again for every mixed view (twice timm's work per view).

Every choice stays a function of (seed, sample, view) and the rows: the pairing of
(seed, group, a), the mix uniforms of the pair's lower row, the partner's params its own
(stored as ``p_*`` like elem mode, so a replay needs nothing but the stored params).
Stage 2's side (pairs side by side in a plan) is ``cache.epoch.pair_order``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

GROUP = 16
_U64 = (1 << 64) - 1


def _perm(seed: int, group: int, aug: int, size: int) -> np.ndarray:
    """The seeded order of a group's rows for view ``aug`` (bit 63 set: never a sample key)."""
    key = ((int(seed) & _U64) << 64) | (1 << 63) | (int(group) << 16) | int(aug)
    return np.random.Generator(np.random.Philox(key=key)).permutation(size)


def partners_at(seed: int, rows, augs, n: int, group: int = GROUP) -> np.ndarray:
    """The partner row of each (row, aug) (-1: the odd row of a group), rows < n."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    augs = np.broadcast_to(np.asarray(augs, dtype=np.int64), rows.shape)
    out = np.full(rows.shape, -1, dtype=np.int64)
    g = rows // group
    for gg, aa in {(int(x), int(y)) for x, y in zip(g.tolist(), augs.tolist(), strict=True)}:
        lo = gg * group
        size = min(group, n - lo)
        perm = _perm(seed, gg, aa, size) + lo
        half = size // 2
        mate = np.full(size, -1, dtype=np.int64)
        mate[perm[0 : 2 * half : 2] - lo] = perm[1 : 2 * half : 2]
        mate[perm[1 : 2 * half : 2] - lo] = perm[0 : 2 * half : 2]
        sel = (g == gg) & (augs == aa)
        out[sel] = mate[rows[sel] - lo]
    return out


def partners(seed: int, rows, num_augs: int, n: int, group: int = GROUP) -> np.ndarray:
    """(B, A) partner rows of every view of ``rows``."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    a = np.broadcast_to(np.arange(num_augs), (len(rows), num_augs))
    return partners_at(seed, np.repeat(rows, num_augs), a.reshape(-1), n, group).reshape(
        len(rows), num_augs
    )


def draw_pair_params(
    policy, seed: int, rows, order, num_augs: int, identity_view: bool,
    size_of: Callable[[int], tuple[int, int]] | None,
) -> np.ndarray:  # fmt: skip
    """(B, A, P) float32 params of cache ``rows`` (samples ``order[rows]``) for a pair-mode
    ``StrongPolicy``; ``size_of(row)`` gives an original's (H, W) (needs_size bases)."""
    from kdcache.data import mix
    from kdcache.data.params import philox_uniforms

    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    order = np.asarray(order, dtype=np.int64)
    n, k, km = len(order), policy.k_single, policy.k_single + mix.MIX_UNIFORMS
    part = partners(seed, rows, num_augs, n, int(policy.strong.get("mix_group", GROUP)))
    if identity_view:
        part[:, 0] = -1  # view 0 is the eval view: never mixed
    need = np.unique(np.concatenate([rows, part[part >= 0]]))
    u = philox_uniforms(seed, order[need], num_augs * km).reshape(len(need), num_augs, km)
    sizes = None
    if policy.base.needs_size:
        sizes = np.array([size_of(int(r)) for r in need], dtype=np.float64).reshape(-1, 1, 2)
    single = policy._single(u[..., :k], sizes)  # (M, A, s): the pre-mix params of each row
    me = np.searchsorted(need, rows)
    mate = np.searchsorted(need, np.where(part >= 0, part, rows[:, None]))
    low = np.where((part >= 0) & (part < rows[:, None]), mate, me[:, None])  # pair's lower row
    m = policy._draw_mix(u[low, np.arange(num_augs), k:km])  # the same lam/box for both rows
    on = (part >= 0) & (m[..., 0] > 0)
    m[..., 2] = np.where(on, part, 0)
    m[~on] = (0, 1, 0, 0, 0, 0, 0)
    partner = np.where(on[..., None], single[mate, np.arange(num_augs)], 0.0)
    out = np.concatenate([single[me], m, partner], axis=-1).astype(np.float32)
    if identity_view:
        out[:, 0] = policy.identity_params()
    return np.ascontiguousarray(out)
