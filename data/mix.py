"""Color jitter, random erasing and batch-free Mixup/CutMix as stored view params.

Each stage has ``*_uniforms`` (how many Philox uniforms it takes), a vectorized draw
(uniforms -> float32 params) and a replay on one image. The draws follow torchvision's
``ColorJitter.get_params`` and timm's ``RandomErasing`` / ``Mixup(mode="elem")``; the replays
work on uint8 views (``README`` "Strong augmentation" states per op what equals timm).

Layouts (float32): color jitter (order0..3, brightness, contrast, saturation, hue): the
order is torchvision's ``fn_idx``, a factor of -1 = that adjustment off; erasing ``count``
rects (top, left, h, w) in view pixels (h = 0: none) + ``seed`` of the fill noise; mix
(mode 0 none / 1 mixup / 2 cutmix, lam, partner row, y0, y1, x0, x1).
"""

from __future__ import annotations

import math

import numpy as np

CJ_FIELDS = ("cj_order0", "cj_order1", "cj_order2", "cj_order3", "cj_b", "cj_c", "cj_s", "cj_h")
MIX_FIELDS = ("mix_mode", "mix_lam", "mix_row", "mix_y0", "mix_y1", "mix_x0", "mix_x1")
MIX_UNIFORMS = 6  # apply, switch, beta key, partner, cy, cx
_ERASE_AREA, _ERASE_ASPECT, _ATTEMPTS = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3)), 10


def jitter_ranges(cj) -> list[list[float] | None]:
    """timm's scalar/3/4-tuple --color-jitter -> torchvision's (lo, hi) per factor."""
    cj = [float(v) for v in (cj if isinstance(cj, (list, tuple)) else [cj] * 3)]
    cj += [0.0] * (4 - len(cj))
    out: list[list[float] | None] = []
    for k, v in enumerate(cj):
        if k < 3:
            out.append(None if v == 0 else [max(0.0, 1.0 - v), 1.0 + v])
        else:
            out.append(None if v == 0 else [-v, v])
    return out


def draw_jitter(ranges, u: np.ndarray) -> np.ndarray:
    """(..., 8) uniforms -> (..., 8): the order (a permutation of 0..3) and the factors."""
    out = np.empty(u.shape[:-1] + (8,), dtype=np.float32)
    out[..., :4] = np.argsort(u[..., :4], axis=-1)
    for k, r in enumerate(ranges):
        out[..., 4 + k] = -1.0 if r is None else r[0] + (r[1] - r[0]) * u[..., 4 + k]
    return out


def apply_jitter(img, p: np.ndarray):
    """torchvision ``ColorJitter.forward`` with these params, on a PIL image."""
    import torchvision.transforms.functional as TF

    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in np.asarray(p[:4]).astype(np.int64):
        f = float(p[4 + k])
        if f != -1.0:
            img = fns[k](img, f)
    return img


def erase_uniforms(count: int) -> int:
    return 3 + count * (2 * _ATTEMPTS + 2)


def draw_erase(prob: float, count: int, size, u: np.ndarray) -> np.ndarray:
    """timm ``RandomErasing._erase`` (max_count ``count``) on a view of ``size`` (H, W)."""
    h_img, w_img = int(size[0]), int(size[1])
    lead = u.shape[:-1]
    flat = u.reshape(-1, u.shape[-1])
    out = np.zeros((len(flat), 4 * count + 1), dtype=np.float32)
    for r, v in enumerate(flat):
        out[r, -1] = math.floor(v[2] * (1 << 24))
        if v[0] > prob:
            continue
        n = 1 if count == 1 else 1 + min(int(v[1] * count), count - 1)
        for c in range(n):
            w = v[3 + c * (2 * _ATTEMPTS + 2) :]
            for t in range(_ATTEMPTS):
                area = _ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * w[2 * t]
                area *= h_img * w_img / n
                ar = math.exp(
                    _ERASE_ASPECT[0] + (_ERASE_ASPECT[1] - _ERASE_ASPECT[0]) * w[2 * t + 1]
                )
                h, ww = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                if ww < w_img and h < h_img:
                    top = math.floor(w[2 * _ATTEMPTS] * (h_img - h + 1))
                    left = math.floor(w[2 * _ATTEMPTS + 1] * (w_img - ww + 1))
                    out[r, 4 * c : 4 * c + 4] = (top, left, h, ww)
                    break
    return out.reshape(lead + (4 * count + 1,))


def erase_fill(mode: str, seed: int, shape, mean, std) -> np.ndarray:
    """uint8 fill of one rect: timm's normalized fill (0 / per-channel / per-pixel N(0,1)
    from Philox(seed)) mapped back to pixels, rounded and clipped."""
    c, h, w = shape
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    z = erase_normals(mode, seed, shape)
    px = np.rint(np.clip((mean + std * z) * np.float32(255), 0, 255)).astype(np.uint8)
    return np.broadcast_to(px, (c, h, w))


def erase_normals(mode: str, seed: int, shape) -> np.ndarray:
    """The N(0,1) fill of one rect in timm's normalized units: (c,1,1) zeros (const), per
    channel (rand) or per pixel (pixel), float32 draws of Philox(seed)."""
    c, h, w = shape
    if mode == "const":
        return np.zeros((c, 1, 1), dtype=np.float32)
    rng = np.random.Generator(np.random.Philox(key=int(seed)))
    return rng.standard_normal((c, h, w) if mode == "pixel" else (c, 1, 1), dtype=np.float32)


def apply_erase(x: np.ndarray, p: np.ndarray, mode: str, mean, std) -> np.ndarray:
    """Erase the stored rects of uint8 (3, H, W) ``x`` (in place, returned)."""
    seed = int(p[-1])
    for k in range(0, len(p) - 1, 4):
        top, left, h, w = (int(v) for v in p[k : k + 4])
        if h > 0 and w > 0:
            x[:, top : top + h, left : left + w] = erase_fill(
                mode, seed * 16 + k // 4, (x.shape[0], h, w), mean, std
            )
    return x


def draw_mix(cfg: dict, size, num_rows: int, u: np.ndarray) -> np.ndarray:
    """timm ``Mixup`` in elem mode, one view at a time: mixup or cutmix (switch prob), lam
    ~ Beta(alpha, alpha) applied with mix prob, partner row uniform over the cache rows,
    cutmix box centred at uniform (cy, cx) with lam corrected to the box area."""
    h_img, w_img = int(size[0]), int(size[1])
    lead = u.shape[:-1]
    flat = u.reshape(-1, u.shape[-1])
    out = np.zeros((len(flat), len(MIX_FIELDS)), dtype=np.float32)
    out[:, 1] = 1.0
    ma, ca = float(cfg["mixup"]), float(cfg["cutmix"])
    for r, v in enumerate(flat):
        if v[0] >= cfg["mixup_prob"] or (ma <= 0 and ca <= 0):
            continue
        cut = ca > 0 and (ma <= 0 or v[1] < cfg["switch_prob"])
        alpha = ca if cut else ma
        rng = np.random.Generator(np.random.Philox(key=int(v[2] * (1 << 53))))
        lam = float(np.float32(rng.beta(alpha, alpha)))
        row = min(int(v[3] * num_rows), num_rows - 1)
        if not cut:
            out[r] = (1, lam, row, 0, 0, 0, 0)
            continue
        cy, cx = min(int(v[4] * h_img), h_img - 1), min(int(v[5] * w_img), w_img - 1)
        (y0, y1, x0, x1), lam = cutmix_box(lam, cy, cx, h_img, w_img)
        out[r] = (2, lam, row, y0, y1, x0, x1)
    return out.reshape(lead + (len(MIX_FIELDS),))


def cutmix_box(lam: float, cy: int, cx: int, h: int, w: int) -> tuple[tuple[int, ...], float]:
    """timm's ``rand_bbox`` around centre (cy, cx) for area 1 - lam, and lam corrected to
    the clipped box's area (``correct_lam``)."""
    rat = math.sqrt(1.0 - lam)
    ch, cw = int(h * rat), int(w * rat)
    y0, y1 = (int(v) for v in np.clip([cy - ch // 2, cy + (ch + 1) // 2], 0, h))
    x0, x1 = (int(v) for v in np.clip([cx - cw // 2, cx + (cw + 1) // 2], 0, w))
    return (y0, y1, x0, x1), 1.0 - float((y1 - y0) * (x1 - x0)) / float(h * w)


def apply_mix(x: np.ndarray, partner: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mix uint8 (3, H, W) views: lam*x + (1-lam)*partner (float32, rounded) or paste the
    partner's box (cutmix)."""
    mode, lam = int(p[0]), np.float32(p[1])
    if mode == 1:
        y = x.astype(np.float32) * lam + partner.astype(np.float32) * (np.float32(1) - lam)
        return np.rint(np.clip(y, 0, 255)).astype(np.uint8)
    if mode == 2:
        y0, y1, x0, x1 = (int(v) for v in p[3:7])
        x = x.copy()
        x[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
    return x
