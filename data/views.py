"""Seeded view policies, applied batched on raw tensors.

A policy turns uniforms into parameters (``from_uniforms``: vectorized, pure) and applies
parameters to a raw batch (``apply``: batched, deterministic). ``view_params_for`` draws the
uniforms of sample ``i`` from ``Generator(Philox(key=(seed << 64) | i))``: aug ``a`` takes the
stream's numbers ``[a*K, (a+1)*K)`` (K = ``num_uniforms``), so params depend only on
``(seed, i, a)`` — not on the batch, its order, the number of augs, workers or world size.
Stage 2 replays the *stored* params, so an RNG change in numpy cannot break replay.

Param layouts (float32):
  identity   (0,)                       P=1
  crop-flip  (dx, dy, flip)             offsets into the zero-padded image, dx,dy in [0, 2*pad]
  rrc-flip   (top, left, h, w, flip)    box as fractions of the raw image, flip in {0,1}
  token-mask (seed,)                    integer < 2**24 (exact in float32); -1 = no masking
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import KdcacheError

_U64 = (1 << 64) - 1


class ViewPolicy:
    """Base class: ``name``, ``param_dim``, ``params`` (json-able constructor kwargs)."""

    name = "base"
    param_dim = 1
    num_uniforms = 1

    def __init__(self, **params) -> None:
        self.params = params

    def from_uniforms(self, u: np.ndarray) -> np.ndarray:
        """(..., K) uniforms in [0,1) -> (..., P) float32 params."""
        raise NotImplementedError

    def sample_params(self, rng: np.random.Generator) -> np.ndarray:
        return self.from_uniforms(rng.random(self.num_uniforms))

    def identity_params(self) -> np.ndarray:
        """Params of the un-augmented (eval) view."""
        raise NotImplementedError

    def apply(self, raw_batch, params: torch.Tensor):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def _size2(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def to_float(raw: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 in [0,1]."""
    if raw.dtype != torch.uint8 or raw.dim() != 4:
        raise KdcacheError(
            f"image views need uint8 (B,3,H,W) batches, got {raw.dtype} {tuple(raw.shape)}"
        )
    return raw.to(torch.float32).div_(255.0)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Plain bilinear resize (align_corners=False, no antialias): rrc-flip's full box equals it."""
    s = _size2(size)
    if s is None or tuple(x.shape[-2:]) == s:
        return x
    return F.interpolate(x, size=s, mode="bilinear", align_corners=False)


class Identity(ViewPolicy):
    """Eval view: images -> float [0,1] (resized to ``size`` if given); text -> ids + mask."""

    name = "identity"

    def __init__(self, size=None, pad_id: int = 0) -> None:
        super().__init__(size=list(_size2(size)) if size is not None else None, pad_id=int(pad_id))

    def from_uniforms(self, u: np.ndarray) -> np.ndarray:
        return np.zeros(u.shape[:-1] + (1,), dtype=np.float32)

    def identity_params(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def apply(self, raw_batch, params: torch.Tensor | None = None):
        if raw_batch.dtype == torch.long:
            return text_inputs(raw_batch, self.params["pad_id"])
        return resize(to_float(raw_batch), self.params["size"])


class CropFlip(ViewPolicy):
    """CIFAR augmentation: zero-pad ``pad``, random crop of the raw size, horizontal flip."""

    name = "crop-flip"
    param_dim = 3
    num_uniforms = 3

    def __init__(self, pad: int = 4, size=None) -> None:
        super().__init__(pad=int(pad), size=list(_size2(size)) if size is not None else None)

    def from_uniforms(self, u: np.ndarray) -> np.ndarray:
        n = 2 * self.params["pad"] + 1
        out = np.empty(u.shape[:-1] + (3,), dtype=np.float32)
        out[..., :2] = np.minimum(np.floor(u[..., :2] * n), n - 1)
        out[..., 2] = u[..., 2] < 0.5
        return out

    def identity_params(self) -> np.ndarray:
        p = self.params["pad"]
        return np.array([p, p, 0], dtype=np.float32)

    def apply(self, raw_batch: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """One padded tensor + a flat gather (no per-image loop)."""
        b, c, h, w = raw_batch.shape
        pad = self.params["pad"]
        params = torch.as_tensor(params).reshape(b, 3).to(raw_batch.device)
        hp, wp = h + 2 * pad, w + 2 * pad
        padded = F.pad(raw_batch, (pad, pad, pad, pad)).reshape(b, c, hp * wp)
        dx = params[:, 0].long().clamp_(0, 2 * pad)
        dy = params[:, 1].long().clamp_(0, 2 * pad)
        flip = params[:, 2] > 0.5
        xs = torch.arange(w, device=raw_batch.device)
        cols = torch.where(flip[:, None], w - 1 - xs, xs) + dx[:, None]  # (B, W)
        rows = torch.arange(h, device=raw_batch.device)[None, :] + dy[:, None]  # (B, H)
        idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out = torch.gather(padded, 2, idx).reshape(b, c, h, w)
        return resize(to_float(out), self.params["size"])


class RandomResizedCropFlip(ViewPolicy):
    """torchvision-style RandomResizedCrop (+ h-flip) with a relative box, via grid_sample.

    Box sampling follows torchvision on a unit square (aspect ratios relative to the raw image):
    10 attempts of (area ~ U(scale), log-ratio ~ U(log ratio)), first that fits wins, else the
    full image (the center fallback for a square image with 1 in ratio). Output is ``size``.
    """

    name = "rrc-flip"
    param_dim = 5
    attempts = 10
    num_uniforms = 4 * attempts + 1

    def __init__(self, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        super().__init__(
            size=list(_size2(size)) if size is not None else None,
            scale=[float(v) for v in scale],
            ratio=[float(v) for v in ratio],
        )

    def from_uniforms(self, u: np.ndarray) -> np.ndarray:
        lead = u.shape[:-1]
        a = u[..., : 4 * self.attempts].reshape(lead + (self.attempts, 4))
        s0, s1 = self.params["scale"]
        lr0, lr1 = math.log(self.params["ratio"][0]), math.log(self.params["ratio"][1])
        area = s0 + (s1 - s0) * a[..., 0]
        ratio = np.exp(lr0 + (lr1 - lr0) * a[..., 1])
        w = np.sqrt(area * ratio)
        h = np.sqrt(area / ratio)
        ok = (w <= 1.0) & (h <= 1.0)
        first = np.argmax(ok, axis=-1)[..., None]
        any_ok = ok.any(axis=-1)
        pick = lambda v: np.take_along_axis(v, first, axis=-1)[..., 0]  # noqa: E731
        h, w = pick(h), pick(w)
        top, left = pick(a[..., 2]) * (1.0 - h), pick(a[..., 3]) * (1.0 - w)
        r0, r1 = self.params["ratio"]
        fh = np.where(r0 > 1, 1 / r0, 1.0)  # fallback: center crop with clamped ratio
        fw = np.where(r1 < 1, r1, 1.0)
        out = np.empty(lead + (5,), dtype=np.float32)
        out[..., 0] = np.where(any_ok, top, (1 - fh) / 2)
        out[..., 1] = np.where(any_ok, left, (1 - fw) / 2)
        out[..., 2] = np.where(any_ok, h, fh)
        out[..., 3] = np.where(any_ok, w, fw)
        out[..., 4] = u[..., -1] < 0.5
        return out

    def identity_params(self) -> np.ndarray:
        return np.array([0, 0, 1, 1, 0], dtype=np.float32)

    def apply(self, raw_batch: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = to_float(raw_batch)
        b = x.shape[0]
        oh, ow = _size2(self.params["size"]) or tuple(x.shape[-2:])
        p = torch.as_tensor(params, dtype=torch.float32).reshape(b, 5).to(x.device)
        fy = (torch.arange(oh, dtype=torch.float32, device=x.device) + 0.5) / oh  # (oh,)
        fx = (torch.arange(ow, dtype=torch.float32, device=x.device) + 0.5) / ow
        fx = torch.where(p[:, 4:5] > 0.5, 1.0 - fx, fx)  # (B, ow)
        gy = 2.0 * (p[:, 0:1] + p[:, 2:3] * fy) - 1.0  # (B, oh)
        gx = 2.0 * (p[:, 1:2] + p[:, 3:4] * fx) - 1.0  # (B, ow)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TokenMask(ViewPolicy):
    """Mask ``round(p * n)`` of the n non-special tokens, chosen by a per-sample seed."""

    name = "token-mask"
    param_dim = 1
    num_uniforms = 1

    def __init__(
        self,
        mask_id: int | None = None,
        pad_id: int = 0,
        special_ids=(),
        p: float = 0.15,
        tokenizer=None,
    ) -> None:
        if tokenizer is not None:
            mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_id
            special_ids = sorted(set(special_ids) | set(tokenizer.all_special_ids))
        if mask_id is None:
            raise KdcacheError("token-mask needs the tokenizer's mask token id (mask_id)")
        if not 0.0 <= p <= 1.0:
            raise KdcacheError(f"token-mask p must lie in [0, 1], got {p}")
        super().__init__(
            mask_id=int(mask_id),
            pad_id=int(pad_id),
            special_ids=sorted({int(s) for s in special_ids} | {int(pad_id)}),
            p=float(p),
        )

    def from_uniforms(self, u: np.ndarray) -> np.ndarray:
        return np.floor(u[..., :1] * (1 << 24)).astype(np.float32)

    def identity_params(self) -> np.ndarray:
        return np.array([-1], dtype=np.float32)

    def apply(self, raw_batch: torch.Tensor, params: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(raw_batch, dtype=torch.long)
        b, length = ids.shape
        seeds = torch.as_tensor(params).reshape(b, -1)[:, 0].long().tolist()
        rows = [_seed_scores(s, length) for s in seeds]
        scores = torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(b, length))
        eligible = ~torch.isin(ids, torch.tensor(self.params["special_ids"], dtype=torch.long))
        eligible &= torch.isfinite(scores)
        scores = scores.masked_fill(~eligible, float("inf"))
        k = torch.round(eligible.sum(1).double() * self.params["p"]).long()  # (B,)
        rank = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        masked = ids.masked_fill((rank < k[:, None]) & eligible, self.params["mask_id"])
        return text_inputs(masked, self.params["pad_id"], original=ids)


def _seed_scores(seed: int, length: int) -> np.ndarray:
    """Per-position random scores of one sample; seed -1 (identity) masks nothing."""
    if seed < 0:
        return np.full(length, np.inf)
    return np.random.Generator(np.random.Philox(seed)).random(length)


def text_inputs(ids: torch.Tensor, pad_id: int, original: torch.Tensor | None = None) -> dict:
    """Model inputs from (masked) ids; the attention mask comes from the unmasked ids."""
    ref = ids if original is None else original
    return {"input_ids": ids, "attention_mask": (ref != pad_id).long()}


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Token ids (N, max_length), padded and truncated; the raw sample of a text dataset."""
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=int(max_length),
        return_tensors="pt",
    )
    return enc["input_ids"].long()


POLICIES = {p.name: p for p in (Identity, CropFlip, RandomResizedCropFlip, TokenMask)}


def get_policy(name: str, **kw) -> ViewPolicy:
    """Build a policy; ``get_policy(name, **policy.params)`` rebuilds an equal one."""
    if name not in POLICIES:
        raise KdcacheError(f"unknown view policy {name!r}: expected one of {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**kw)
    except TypeError as e:
        raise KdcacheError(f"bad options for view policy {name!r}: {e}") from e


def _sample_key(seed: int, i: int) -> int:
    return ((int(seed) & _U64) << 64) | (int(i) & _U64)


def philox_uniforms(seed: int, samples: np.ndarray, count: int) -> np.ndarray:
    """(B, count) float64: the first ``count`` numbers of
    ``Generator(Philox(key=(seed << 64) | i)).random()`` for each i, ~10x faster than building
    a Generator per sample (one bit generator whose key/counter state is reset)."""
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
    policy: ViewPolicy, seed: int, samples, num_augs: int, identity_view: bool
) -> np.ndarray:
    """(B, A, P) float32 params for global sample indices ``samples``; see module docstring."""
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    if num_augs < 1:
        raise KdcacheError(f"num_augs must be >= 1, got {num_augs}")
    if len(samples) and samples.min() < 0:
        raise KdcacheError("sample indices must be >= 0")
    u = philox_uniforms(seed, samples, num_augs * policy.num_uniforms)
    u = u.reshape(len(samples), num_augs, policy.num_uniforms)
    out = policy.from_uniforms(u).astype(np.float32, copy=False)
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
