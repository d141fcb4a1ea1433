"""RandAugment / TrivialAugment / AutoAugment with timm's op set and magnitude rules, as
stored, replayable view params.

``parse_aa`` reads timm's ``--aa`` grammar (``rand-m9-n2-mstd0.5-inc1-p0.5-mmax10``,
``original[-mstd0.5]``, ``originalr``, ``v0``... see README "Strong augmentation") into a
json-able config; ``trivialaugment`` is TrivialAugment (Müller & Hutter 2021) on timm's
increasing op set: one op per image, magnitude uniform in [0, 10], always applied
(timm's ``rand-n1-m10-mstd101-inc1-p1``). ``draw_layers`` turns uniforms into one row of 4
floats per layer: (op id or -1 when skipped, magnitude after noise and clamping, negate
flag, resample 0 bilinear / 1 bicubic); ``apply_layers`` replays them on a PIL image with
the same PIL calls as timm's ``AugmentOp`` (identical pixels for the same params).
"""

from __future__ import annotations

import re

import numpy as np
from kdcache.cache.errors import KdcacheError

LEVEL_DENOM = 10.0
# op ids are stored in caches: append only, never reorder
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing",
    "PosterizeOriginal", "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color",
    "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing",
    "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
OP_ID = {name: i for i, name in enumerate(OPS)}
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")  # fmt: skip
_INC = {"Posterize": "PosterizeIncreasing", "Solarize": "SolarizeIncreasing",
        "Color": "ColorIncreasing", "Contrast": "ContrastIncreasing",
        "Brightness": "BrightnessIncreasing", "Sharpness": "SharpnessIncreasing"}  # fmt: skip
RAND_INC_OPS = tuple(_INC.get(n, n) for n in RAND_OPS)
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel",
          "TranslateYRel", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing"}  # fmt: skip
LAYER_FIELDS = ("op", "mag", "neg", "resample")
UNIFORMS_PER_LAYER = 6  # op/sub-policy choice, prob, 2 gauss, negate, resample

# AutoAugment ImageNet policy (Cubuk et al. 2019, Table 9), as (op, prob, magnitude) pairs
_ORIGINAL = (
    (("PosterizeOriginal", .4, 8), ("Rotate", .6, 9)),
    (("Solarize", .6, 5), ("AutoContrast", .6, 5)),
    (("Equalize", .8, 8), ("Equalize", .6, 3)),
    (("PosterizeOriginal", .6, 7), ("PosterizeOriginal", .6, 6)),
    (("Equalize", .4, 7), ("Solarize", .2, 4)), (("Equalize", .4, 4), ("Rotate", .8, 8)),
    (("Solarize", .6, 3), ("Equalize", .6, 7)), (("PosterizeOriginal", .8, 5), ("Equalize", 1., 2)),
    (("Rotate", .2, 3), ("Solarize", .6, 8)), (("Equalize", .6, 8), ("PosterizeOriginal", .4, 6)),
    (("Rotate", .8, 8), ("Color", .4, 0)), (("Rotate", .4, 9), ("Equalize", .6, 2)),
    (("Equalize", 0., 7), ("Equalize", .8, 8)), (("Invert", .6, 4), ("Equalize", 1., 8)),
    (("Color", .6, 4), ("Contrast", 1., 8)), (("Rotate", .8, 8), ("Color", 1., 2)),
    (("Color", .8, 8), ("Solarize", .8, 7)), (("Sharpness", .4, 7), ("Invert", .6, 8)),
    (("ShearX", .6, 5), ("Equalize", 1., 9)), (("Color", .4, 0), ("Equalize", .6, 3)),
    (("Equalize", .4, 7), ("Solarize", .2, 4)), (("Solarize", .6, 5), ("AutoContrast", .6, 5)),
    (("Invert", .6, 4), ("Equalize", 1., 8)), (("Color", .6, 4), ("Contrast", 1., 8)),
    (("Equalize", .8, 8), ("Equalize", .6, 3)),
)  # fmt: skip
AA_POLICIES = {
    "original": _ORIGINAL,
    # the research variant: bits discarded increase with the magnitude
    "originalr": tuple(
        tuple(("PosterizeIncreasing" if o == "PosterizeOriginal" else o, p, m) for o, p, m in sp)
        for sp in _ORIGINAL
    ),
}


def _bad(aa: str, why: str) -> KdcacheError:
    return KdcacheError(
        f"--aa {aa!r}: {why}; expected rand-m9-mstd0.5-inc1 style (sections m, n, p, mstd, "
        f"mmax, inc), {', '.join(AA_POLICIES)} [-mstd0.5], or trivialaugment"
    )


def parse_aa(aa: str) -> dict:
    """timm's --aa grammar -> {"kind", "layers", "magnitude", "prob", "mstd", "mmax",
    "ops" | "policy"}; one error naming --aa for a string it does not accept."""
    aa = str(aa).strip()
    if aa == "trivialaugment":
        return {"kind": "rand", "ops": list(RAND_INC_OPS), "layers": 1, "magnitude": 10.0,
                "prob": 1.0, "mstd": float("inf"), "mmax": LEVEL_DENOM}  # fmt: skip
    head, *sections = aa.split("-")
    if head != "rand" and head not in AA_POLICIES:
        why = "augmix and 3a are not replayable here" if head in ("augmix", "3a") else (
            f"unknown policy {head!r}")  # fmt: skip
        raise _bad(aa, why)
    cfg = {"magnitude": LEVEL_DENOM, "layers": 2, "prob": 0.5, "mstd": 0.0, "mmax": LEVEL_DENOM}
    inc = False
    for c in sections:
        parts = re.split(r"(\d.*)", c)
        key, val = (parts[0], parts[1]) if len(parts) >= 2 else (c, "")
        allowed = ("mstd",) if head != "rand" else ("m", "n", "p", "mstd", "mmax", "inc")
        if key not in allowed or not val:
            raise _bad(aa, f"unknown section {c!r}")
        try:
            v = float(val)
        except ValueError:
            raise _bad(aa, f"section {c!r} has no number") from None
        if key == "mstd":
            cfg["mstd"] = float("inf") if v > 100 else v
        elif key == "inc":
            inc = bool(int(v))
        elif key == "p":
            cfg["prob"] = v
        else:
            cfg[{"m": "magnitude", "n": "layers", "mmax": "mmax"}[key]] = float(int(v))
    if head == "rand":
        if cfg["layers"] < 1 or not 0.0 <= cfg["prob"] <= 1.0:
            raise _bad(aa, "n must be >= 1 and p in [0, 1]")
        cfg["layers"] = int(cfg["layers"])
        return {"kind": "rand", "ops": list(RAND_INC_OPS if inc else RAND_OPS), **cfg}
    return {"kind": "auto", "policy": head, "layers": 2, "mstd": cfg["mstd"], "mmax": LEVEL_DENOM}


def num_uniforms(cfg: dict | None) -> int:
    return 0 if not cfg else 1 + UNIFORMS_PER_LAYER * cfg["layers"]


def _noisy(m: np.ndarray, u: np.ndarray, cfg: dict) -> np.ndarray:
    """timm's magnitude noise: uniform in [0, m] (mstd inf) or gauss(m, mstd); clamp."""
    if cfg["mstd"] == float("inf"):
        m = u[..., 2] * m
    elif cfg["mstd"] > 0:
        g = np.sqrt(-2.0 * np.log1p(-u[..., 2])) * np.cos(2 * np.pi * u[..., 3])
        m = m + cfg["mstd"] * g
    return np.clip(m, 0.0, cfg["mmax"])


def draw_layers(cfg: dict | None, u: np.ndarray) -> np.ndarray:
    """(..., num_uniforms) -> (..., layers * 4) float32 (see module docstring)."""
    lead = u.shape[:-1]
    if not cfg:
        return np.zeros(lead + (0,), dtype=np.float32)
    n = cfg["layers"]
    lu = u[..., 1:].reshape(lead + (n, UNIFORMS_PER_LAYER))
    out = np.zeros(lead + (n, 4), dtype=np.float64)
    if cfg["kind"] == "rand":
        ids = np.array([OP_ID[o] for o in cfg["ops"]])
        op = ids[np.minimum((lu[..., 0] * len(ids)).astype(np.int64), len(ids) - 1)]
        mag = np.full(op.shape, float(cfg["magnitude"]))
        prob = np.full(op.shape, float(cfg["prob"]))
    else:
        table = AA_POLICIES[cfg["policy"]]
        k = np.minimum((u[..., 0] * len(table)).astype(np.int64), len(table) - 1)
        op = np.array([[OP_ID[o] for o, _, _ in sp] for sp in table])[k]
        prob = np.array([[p for _, p, _ in sp] for sp in table])[k]
        mag = np.array([[m for _, _, m in sp] for sp in table], dtype=np.float64)[k]
    skip = (prob < 1.0) & (lu[..., 1] > prob)
    out[..., 0] = np.where(skip, -1, op)
    out[..., 1] = np.where(skip, 0.0, _noisy(mag, lu, cfg))
    out[..., 2] = lu[..., 4] > 0.5
    out[..., 3] = lu[..., 5] >= 0.5
    return out.reshape(lead + (4 * n,)).astype(np.float32)


def _level(name: str, m: float, neg: bool, size: tuple[int, int], hp: dict):
    """timm's level -> op argument, for magnitude m (floats as timm computes them)."""
    lv = m / LEVEL_DENOM
    sign = -1.0 if neg and name in SIGNED else 1.0
    if name == "Rotate":
        return sign * lv * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * lv * 0.3
    if name in ("TranslateX", "TranslateY"):
        return sign * lv * float(hp["translate_const"])
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * lv * 0.45 * (size[0] if name == "TranslateXRel" else size[1])
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return max(0.1, 1.0 + sign * lv * 0.9)
    if name == "Posterize":
        return int(lv * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(lv * 4)
    if name == "PosterizeOriginal":
        return int(lv * 4) + 4
    if name == "Solarize":
        return min(256, int(lv * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(lv * 256))
    if name == "SolarizeAdd":
        return min(128, int(lv * 110))
    return None


def apply_op(img, name: str, m: float, neg: bool, resample: int, hp: dict):
    """One op on a PIL image, the calls timm's AugmentOp makes (fill = ``hp["fill"]``)."""
    from PIL import Image, ImageEnhance, ImageOps

    arg = _level(name, float(m), bool(neg), img.size, hp)
    rs = Image.Resampling.BICUBIC if resample else Image.Resampling.BILINEAR
    kw = {"resample": rs, "fillcolor": tuple(hp["fill"])}
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **kw)
    if name.startswith("Posterize"):
        if arg <= 0:  # 0 bits kept: black (older Pillow's result; Pillow >= 10 raises)
            return Image.new(img.mode, img.size)
        return img if arg >= 8 else ImageOps.posterize(img, arg)
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * 3) if img.mode == "RGB" else img
    for prefix, enh in (("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                        ("Brightness", ImageEnhance.Brightness),
                        ("Sharpness", ImageEnhance.Sharpness)):  # fmt: skip
        if name.startswith(prefix):
            return enh(img).enhance(arg)
    coeffs = {
        "ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
        "TranslateX": (1, 0, arg, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, arg),
        "TranslateXRel": (1, 0, arg, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg),
    }[name]  # fmt: skip
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, **kw)


def apply_layers(img, layers: np.ndarray, hp: dict):
    """Replay the stored (op, mag, neg, resample) rows on a PIL image."""
    for op, m, neg, rs in np.asarray(layers, dtype=np.float64).reshape(-1, 4):
        if op >= 0:
            img = apply_op(img, OPS[int(op)], m, neg > 0.5, int(rs), hp)
    return img


# `kdcache list views`: the argument each op gets from magnitude m (timm's rules; signed ops
# are negated when neg = 1), and how the replay compares with timm's AugmentOp
OP_DOCS = {
    "AutoContrast": "ImageOps.autocontrast (no argument)",
    "Equalize": "ImageOps.equalize (no argument)",
    "Invert": "ImageOps.invert (no argument)",
    "Rotate": "rotate by ±m/10*30 degrees, fill = teacher mean",
    "Posterize": "keep int(m/10*4) bits",
    "PosterizeIncreasing": "keep 4 - int(m/10*4) bits",
    "PosterizeOriginal": "keep int(m/10*4) + 4 bits",
    "Solarize": "invert pixels >= min(256, int(m/10*256))",
    "SolarizeIncreasing": "invert pixels >= 256 - min(256, int(m/10*256))",
    "SolarizeAdd": "add min(128, int(m/10*110)) to pixels < 128",
    "Color": "saturation factor m/10*1.8 + 0.1",
    "ColorIncreasing": "saturation factor max(0.1, 1 ± m/10*0.9)",
    "Contrast": "contrast factor m/10*1.8 + 0.1",
    "ContrastIncreasing": "contrast factor max(0.1, 1 ± m/10*0.9)",
    "Brightness": "brightness factor m/10*1.8 + 0.1",
    "BrightnessIncreasing": "brightness factor max(0.1, 1 ± m/10*0.9)",
    "Sharpness": "sharpness factor m/10*1.8 + 0.1",
    "SharpnessIncreasing": "sharpness factor max(0.1, 1 ± m/10*0.9)",
    "ShearX": "affine shear ±m/10*0.3 along x",
    "ShearY": "affine shear ±m/10*0.3 along y",
    "TranslateX": "shift ±m/10*translate_const pixels (0.45 * view size) along x",
    "TranslateY": "shift ±m/10*translate_const pixels along y",
    "TranslateXRel": "shift ±m/10*0.45 of the width",
    "TranslateYRel": "shift ±m/10*0.45 of the height",
}
