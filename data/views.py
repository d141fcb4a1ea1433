"""Seeded view policies, one registry: ``POLICIES`` (``@register_policy``).

A policy turns uniforms into parameters (``from_uniforms``: vectorized, pure; policies with
``needs_size`` also take the original image size, drawn after decoding, in the loader's
worker) and cuts the view from the original sample: ``view(img, params)`` per sample (an RGB
PIL image at native size -> uint8 ``(3,h,w)``), or ``apply(batch, params)`` batched on same-size
in-RAM uint8 tensors / token ids (``batched``). ``view_params_for`` draws the uniforms of
sample ``i`` from ``Generator(Philox(key=(seed << 64) | i))``: aug ``a`` takes the stream's
numbers ``[a*K, (a+1)*K)`` (K = ``num_uniforms``), so params depend only on ``(seed, i, a)``
(and the image size) — not on the batch, its order, the number of augs, workers or world
size. Stage 2 replays the *stored* params, so an RNG change in numpy cannot break replay.

``view_params`` layouts (float32, ``param_names`` of each policy; README "Views"):
  identity   (unused,)                  always 0
  crop-flip  (dx, dy, flip)             offsets into the zero-padded image, dx,dy in [0, 2*pad]
  rrc-flip   (top, left, h, w, flip)    box as fractions of the original image (pixels =
                                        round(fraction * H or W)); h = w = 0: the eval view
  token-mask (seed,)                    integer < 2**24 (exact in float32); -1 = no masking
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import lookup, registry_decorator
from kdcache.data.params import (  # noqa: F401 - re-exported: the views API
    _sample_key,
    philox_uniforms,
    view_digest,
    view_params_for,
)
from kdcache.data.text import _seed_scores, text_inputs, tokenize_texts  # noqa: F401 - views API
from kdcache.data.transforms import crop_resize, eval_transform, rrc_boxes

POLICIES: dict = {}
register_policy = registry_decorator(POLICIES, "view policy")


class ViewPolicyBase:
    """Shared plumbing; ``params`` are the json-able constructor kwargs (in the spec key)."""

    name = "base"
    modality = "any"
    param_names: tuple[str, ...] = ("unused",)
    num_uniforms = 1
    needs_size = False
    batched = True

    def __init__(self, **params) -> None:
        self.params = params

    @property
    def param_dim(self) -> int:
        return len(self.param_names)

    def from_uniforms(self, u: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
        """(..., K) uniforms in [0,1) (+ (..., 2) original sizes) -> (..., P) float32."""
        raise NotImplementedError

    def sample_params(self, rng: np.random.Generator, size=None) -> np.ndarray:
        return self.from_uniforms(rng.random(self.num_uniforms), size)

    def identity_params(self) -> np.ndarray:
        """Params of the un-augmented (eval) view."""
        raise NotImplementedError

    def apply(self, raw_batch, params: torch.Tensor):
        raise NotImplementedError

    def apply_uint8(self, raw_batch: torch.Tensor, params: torch.Tensor) -> torch.Tensor | None:
        """The batched views as uint8 when no resampling is involved (the exact pixels, no
        float round trip: `kdcache.CachedDataset`); None where only `apply` can make them."""
        return None

    def view(self, img, params: np.ndarray) -> torch.Tensor:
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


def _eval_kw(eval_cfg) -> dict | None:
    if eval_cfg is None:
        return None
    size = _size2(eval_cfg.get("size") or 224)
    return {
        "size": list(size),
        "crop_pct": float(eval_cfg.get("crop_pct", 1.0)),
        "interpolation": str(eval_cfg.get("interpolation", "bilinear")),
    }


def eval_view(img, ev: dict) -> torch.Tensor:
    """The teacher's eval transform (``eval`` params of a policy) on one original image."""
    return eval_transform(img, ev["size"], ev["crop_pct"], ev["interpolation"])


@register_policy("identity", help="the eval view: the teacher's resize + center crop (or text)")
class Identity(ViewPolicyBase):
    """Eval view. With ``eval`` (size, crop_pct, interpolation: the teacher's data config) it
    is timm's eval transform on the original image; without it, in-RAM images -> float [0,1]
    (resized to ``size`` if given) and text -> ids + mask."""

    name = "identity"

    def __init__(self, size=None, pad_id: int = 0, eval=None) -> None:  # noqa: A002
        kw = {"size": list(_size2(size)) if size is not None else None, "pad_id": int(pad_id)}
        if eval is not None:
            kw["eval"] = _eval_kw(eval)
        super().__init__(**kw)
        self.batched = eval is None

    def from_uniforms(self, u: np.ndarray, sizes=None) -> np.ndarray:
        return np.zeros(u.shape[:-1] + (1,), dtype=np.float32)

    def identity_params(self) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def apply(self, raw_batch, params: torch.Tensor | None = None):
        if raw_batch.dtype == torch.long:
            return text_inputs(raw_batch, self.params["pad_id"])
        return resize(to_float(raw_batch), self.params["size"])

    def apply_uint8(self, raw_batch: torch.Tensor, params: torch.Tensor) -> torch.Tensor | None:
        s = _size2(self.params["size"])
        ok = raw_batch.dtype == torch.uint8 and (s is None or tuple(raw_batch.shape[-2:]) == s)
        return raw_batch if ok else None

    def view(self, img, params=None) -> torch.Tensor:
        if "eval" in self.params:
            return eval_view(img, self.params["eval"])
        import torchvision.transforms.functional as TF

        x = TF.pil_to_tensor(img)
        size = self.params["size"]
        return x if size is None else TF.resize(x, size, antialias=True)


@register_policy("crop-flip", help="CIFAR: zero-pad, random crop of the raw size, h-flip")
class CropFlip(ViewPolicyBase):
    """CIFAR augmentation: zero-pad ``pad``, random crop of the raw size, horizontal flip.
    On a native-resolution source the view is cut from the eval-transformed image (``eval``)."""

    name = "crop-flip"
    modality = "image"
    param_names = ("dx", "dy", "flip")
    num_uniforms = 3

    def __init__(self, pad: int = 4, size=None, eval=None) -> None:  # noqa: A002
        kw = {"pad": int(pad), "size": list(_size2(size)) if size is not None else None}
        if eval is not None:
            kw["eval"] = _eval_kw(eval)
        super().__init__(**kw)

    def from_uniforms(self, u: np.ndarray, sizes=None) -> np.ndarray:
        n = 2 * self.params["pad"] + 1
        out = np.empty(u.shape[:-1] + (3,), dtype=np.float32)
        out[..., :2] = np.minimum(np.floor(u[..., :2] * n), n - 1)
        out[..., 2] = u[..., 2] < 0.5
        return out

    def identity_params(self) -> np.ndarray:
        p = self.params["pad"]
        return np.array([p, p, 0], dtype=np.float32)

    def _crop(self, raw_batch: torch.Tensor, params) -> torch.Tensor:
        """uint8 in, uint8 out. On the CPU numpy slices of one padded array (no OpenMP team
        in the calling thread: distill's training thread, a DataLoader's main thread); on
        a device one padded tensor + a flat gather (no per-image loop). Same bytes."""
        b, c, h, w = raw_batch.shape
        pad = self.params["pad"]
        if raw_batch.device.type == "cpu":
            p = np.asarray(torch.as_tensor(params), dtype=np.float32).reshape(b, 3)
            dxy = np.clip(p[:, :2].astype(np.int64), 0, 2 * pad).tolist()
            padded = np.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=np.uint8)
            padded[:, :, pad : pad + h, pad : pad + w] = raw_batch.numpy()
            out = np.empty((b, c, h, w), dtype=np.uint8)
            for j, ((dx, dy), flip) in enumerate(zip(dxy, (p[:, 2] > 0.5).tolist(), strict=True)):
                v = padded[j, :, dy : dy + h, dx : dx + w]
                out[j] = v[:, :, ::-1] if flip else v
            return torch.from_numpy(out)
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
        return torch.gather(padded, 2, idx).reshape(b, c, h, w)

    def apply(self, raw_batch: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return resize(to_float(self._crop(raw_batch, params)), self.params["size"])

    def apply_uint8(self, raw_batch: torch.Tensor, params: torch.Tensor) -> torch.Tensor | None:
        s = _size2(self.params["size"])
        if s is not None and tuple(raw_batch.shape[-2:]) != s:
            return None
        return self._crop(raw_batch, params)

    def view(self, img, params) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        ev = self.params.get("eval")
        x = eval_view(img, ev) if ev else TF.pil_to_tensor(img)
        out = self._crop(x[None], torch.tensor(np.asarray(params, dtype=np.float32)))[0]
        size = self.params["size"]
        return out if size is None or ev else TF.resize(out, size, antialias=True)


@register_policy(
    "rrc-flip", help="ImageNet: torchvision RandomResizedCrop + h-flip on the original"
)
class RandomResizedCropFlip(ViewPolicyBase):
    """torchvision ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip`` on the
    original image: the box is drawn exactly like ``get_params`` on the original (H, W) from
    Philox uniforms, stored as fractions, and replayed as crop + resize (PIL, antialiased,
    ``interpolation``) of the original. The identity view (h = w = 0) is ``eval``: the
    teacher's resize + center crop to ``size``."""

    name = "rrc-flip"
    modality = "image"
    param_names = ("top", "left", "h", "w", "flip")
    attempts = 10
    num_uniforms = 2 * attempts + 3
    needs_size = True
    batched = False

    def __init__(self, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation: str = "bilinear", eval=None) -> None:  # noqa: A002  # fmt: skip
        size = list(_size2(size))
        super().__init__(
            size=size,
            scale=[float(v) for v in scale],
            ratio=[float(v) for v in ratio],
            interpolation=str(interpolation),
            eval=_eval_kw(eval or {"size": size, "crop_pct": 1.0, "interpolation": interpolation}),
        )

    def from_uniforms(self, u: np.ndarray, sizes=None) -> np.ndarray:
        if sizes is None:
            raise KdcacheError("rrc-flip draws its box on the original image size; none given")
        p = self.params
        top, left, h, w = rrc_boxes(u, sizes, p["scale"], p["ratio"], self.attempts)
        hh = np.broadcast_to(np.asarray(sizes, dtype=np.float64)[..., 0], top.shape)
        ww = np.broadcast_to(np.asarray(sizes, dtype=np.float64)[..., 1], top.shape)
        out = np.empty(u.shape[:-1] + (5,), dtype=np.float32)
        out[..., 0], out[..., 1] = top / hh, left / ww
        out[..., 2], out[..., 3] = h / hh, w / ww
        out[..., 4] = u[..., -1] < 0.5
        return out

    def identity_params(self) -> np.ndarray:
        return np.zeros(5, dtype=np.float32)

    def view(self, img, params) -> torch.Tensor:
        if float(params[2]) == 0.0 and float(params[3]) == 0.0:
            return eval_view(img, self.params["eval"])
        return crop_resize(img, params, self.params["size"], self.params["interpolation"])


@register_policy("token-mask", help="text: mask a fraction p of the tokens (per-sample seed)")
class TokenMask(ViewPolicyBase):
    """Mask ``round(p * n)`` of the n non-special tokens, chosen by a per-sample seed; the
    draw is per position, so the mask does not depend on the batch's padded length."""

    name = "token-mask"
    modality = "text"
    param_names = ("seed",)
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

    def from_uniforms(self, u: np.ndarray, sizes=None) -> np.ndarray:
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


def get_policy(name: str, **kw) -> ViewPolicyBase:
    """Build a policy; ``get_policy(name, **policy.params)`` rebuilds an equal one (a
    ``strong`` entry composes data/strong.py's stages on top of the base policy)."""
    cls = lookup(POLICIES, name, "view policy")
    strong = kw.pop("strong", None)
    try:
        base = cls(**kw)
    except TypeError as e:
        raise KdcacheError(f"bad options for view policy {name!r}: {e}") from e
    if strong is None:
        return base
    from kdcache.data.strong import StrongPolicy

    return StrongPolicy(base, strong)
