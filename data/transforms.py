"""Pixel operations on one original image: the teacher's eval transform and torchvision's
RandomResizedCrop box draw + replay. Everything here works on the decoded original (an RGB
``PIL.Image`` at native size) and returns uint8 ``(3, h, w)``; float conversion and
normalization happen in the model, on the device.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def interp_mode(name: str):
    """torchvision ``InterpolationMode`` from a timm/torchvision name (bicubic, bilinear, ...)."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(str(name).lower())


def eval_size(size, crop_pct: float) -> list[int]:
    """timm's eval resize target: ``floor(size / crop_pct)`` per side."""
    return [math.floor(s / crop_pct) for s in size]


def eval_transform(img, size, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm ``create_transform(is_training=False)``: resize (shorter side to
    ``size/crop_pct``, aspect kept) with the model's interpolation, center crop ``size``."""
    import torchvision.transforms.functional as TF

    h, w = int(size[0]), int(size[1])
    scale = eval_size((h, w), crop_pct)
    mode = interp_mode(interpolation)
    if scale[0] == scale[1]:
        img = TF.resize(img, scale[0], interpolation=mode)
    else:  # timm's ResizeKeepRatio: the shorter relative side matches
        iw, ih = img.size
        ratio = min(ih / scale[0], iw / scale[1])
        img = TF.resize(img, [round(ih / ratio), round(iw / ratio)], interpolation=mode)
    img = TF.center_crop(img, [h, w])
    return to_chw(img)


def to_chw(img, flip: bool = False) -> torch.Tensor:
    """uint8 (3, h, w) of a PIL image, through numpy (single-threaded copies: torch's strided
    uint8 copies start an OpenMP team per call, ~100x slower for one small image)."""
    x = np.asarray(img)
    if flip:
        x = x[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=16)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """log of the ratio bounds in float32, exactly as torchvision computes them."""
    lo, hi = torch.log(torch.tensor(ratio)).tolist()
    return lo, hi


def rrc_boxes(
    u: np.ndarray, sizes: np.ndarray, scale, ratio, attempts: int = 10
) -> tuple[np.ndarray, ...]:
    """torchvision ``RandomResizedCrop.get_params`` on images of ``sizes`` (..., 2) = (H, W),
    driven by uniforms ``u`` (..., 2*attempts + 2): per attempt (scale, log-ratio), then the
    top and left draws of ``randint``. Returns integer pixel boxes (top, left, h, w)."""
    lead = u.shape[:-1]
    hh = np.broadcast_to(np.asarray(sizes, dtype=np.float64)[..., 0], lead)
    ww = np.broadcast_to(np.asarray(sizes, dtype=np.float64)[..., 1], lead)
    area = hh * ww
    lr0, lr1 = _log_ratio(tuple(float(r) for r in ratio))
    a = u[..., : 2 * attempts].reshape(lead + (attempts, 2))
    target = area[..., None] * (scale[0] + (scale[1] - scale[0]) * a[..., 0])
    aspect = np.exp(lr0 + (lr1 - lr0) * a[..., 1])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= ww[..., None]) & (h > 0) & (h <= hh[..., None])
    first = np.argmax(ok, axis=-1)[..., None]
    found = ok.any(axis=-1)
    h = np.take_along_axis(h, first, axis=-1)[..., 0]
    w = np.take_along_axis(w, first, axis=-1)[..., 0]
    top = np.floor(u[..., 2 * attempts] * (hh - h + 1))
    left = np.floor(u[..., 2 * attempts + 1] * (ww - w + 1))
    # fallback: central crop, the aspect ratio clamped into [min(ratio), max(ratio)]
    rmin, rmax = min(ratio), max(ratio)
    in_ratio = ww / hh
    fw = np.where(in_ratio < rmin, ww, np.where(in_ratio > rmax, np.rint(hh * rmax), ww))
    fh = np.where(in_ratio < rmin, np.rint(ww / rmin), hh)
    fh = np.where(in_ratio > rmax, hh, fh)
    top = np.where(found, top, (hh - fh) // 2)
    left = np.where(found, left, (ww - fw) // 2)
    return top, left, np.where(found, h, fh), np.where(found, w, fw)


def box_pixels(p, width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) pixels of a stored fractional box on an image of that size."""
    top, left = int(round(float(p[0]) * height)), int(round(float(p[1]) * width))
    h, w = int(round(float(p[2]) * height)), int(round(float(p[3]) * width))
    return top, left, max(1, h), max(1, w)


def crop_resize_pil(img, p, size, interpolation: str = "bilinear"):
    """``crop_resize`` as a PIL image (the same pixels), for PIL ops that follow it."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    top, left, h, w = box_pixels(p, *img.size)
    out = TF.resized_crop(
        img, top, left, h, w, [int(size[0]), int(size[1])], interp_mode(interpolation)
    )
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if float(p[4]) > 0.5 else out


def crop_resize(img, p, size, interpolation: str = "bilinear") -> torch.Tensor:
    """Replay of a stored box on the original: crop, resize to ``size`` (PIL, antialiased),
    then the horizontal flip (RandomResizedCrop followed by RandomHorizontalFlip)."""
    import torchvision.transforms.functional as TF

    top, left, h, w = box_pixels(p, *img.size)
    out = TF.resized_crop(
        img, top, left, h, w, [int(size[0]), int(size[1])], interp_mode(interpolation)
    )
    return to_chw(out, flip=float(p[4]) > 0.5)
