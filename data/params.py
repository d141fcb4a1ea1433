"""Seeded view parameters: per-sample Philox uniforms, ``view_params_for`` (params keyed only by
(seed, sample, aug) and the original size) and ``view_digest`` (replay proofs)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import ViewPolicy

_U64 = (1 << 64) - 1


def _sample_key(seed: int, i: int) -> int:
    return ((int(seed) & _U64) << 64) | (int(i) & _U64)


def philox_uniforms(seed: int, samples: np.ndarray, count: int) -> np.ndarray:
    """(B, count) float64: the first ``count`` numbers of
    ``Generator(Philox(key=(seed << 64) | i)).random()`` for each i, ~10x faster than building
    a Generator per sample (one bit generator whose key/counter state is reset)."""
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    if len(samples) == 1:  # one sample (a loader worker): a fresh generator is cheapest
        gen = np.random.Generator(np.random.Philox(key=_sample_key(seed, int(samples[0]))))
        return gen.random(count)[None]
    bitgen = np.random.Philox(key=0)
    state = bitgen.state
    inner = state["state"]
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    out = np.empty((len(samples), count), dtype=np.float64)
    raw = np.empty((min(len(samples), 1024), count), dtype=np.uint64)  # cache-sized blocks
    hi = int(seed) & _U64
    for start in range(0, len(samples), len(raw)):
        block = samples[start : start + len(raw)].tolist()
        for j, i in enumerate(block):
            inner["key"] = np.array([i & _U64, hi], dtype=np.uint64)
            inner["counter"] = np.zeros(4, dtype=np.uint64)
            state["buffer_pos"] = 4  # empty buffer: the next draw starts at counter 0
            state["has_uint32"] = 0
            bitgen.state = state
            raw[j] = bitgen.random_raw(count)
        bits = raw[: len(block)] >> np.uint64(11)  # numpy's next_double: 53 random bits
        np.multiply(
            bits.view(np.int64), 1.0 / 9007199254740992.0, out=out[start : start + len(block)]
        )
    return out


def view_params_for(
    policy: ViewPolicy,
    seed: int,
    samples,
    num_augs: int,
    identity_view: bool,
    sizes: np.ndarray | None = None,
    partner_sizes: np.ndarray | None = None,
) -> np.ndarray:
    """(B, A, P) float32 params for global sample indices ``samples`` (of original ``sizes``
    (B, 2) = (H, W) for ``needs_size`` policies, and of each view's Mixup/CutMix partner,
    ``partner_sizes`` (B, A, 2)); see module docstring."""
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    if num_augs < 1:
        raise KdcacheError(f"num_augs must be >= 1, got {num_augs}")
    if len(samples) and samples.min() < 0:
        raise KdcacheError("sample indices must be >= 0")
    u = philox_uniforms(seed, samples, num_augs * policy.num_uniforms)
    u = u.reshape(len(samples), num_augs, policy.num_uniforms)
    if sizes is not None:
        sizes = np.asarray(sizes, dtype=np.float64).reshape(len(samples), 1, 2)
    if partner_sizes is None:
        out = policy.from_uniforms(u, sizes)
    else:  # mixing policies: (B, A, 2) original sizes of each view's partner
        ps = np.asarray(partner_sizes, dtype=np.float64).reshape(len(samples), num_augs, 2)
        out = policy.from_uniforms(u, sizes, ps)
    out = out.astype(np.float32, copy=False)
    if identity_view:
        out[:, 0] = policy.identity_params()
    return np.ascontiguousarray(out)


def view_digest(view) -> str:
    """sha256 of a view's dtype, shape and bytes (dict views: over sorted keys)."""
    h = hashlib.sha256()
    items = sorted(view.items()) if isinstance(view, dict) else [("", view)]
    for key, t in items:
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
