"""`kdcache list views`: the strong-augmentation stages (data/strong.py), their options, view
params and replay fidelity."""

from __future__ import annotations

from kdcache.data import augment, mix


def describe() -> list[dict]:
    """`kdcache list views`: the strong stages, their options, view params and fidelity."""
    from kdcache.data.augment import OP_DOCS, OPS

    same = "identical to timm's AugmentOp with the same params (same PIL calls)"
    return [
        {"name": "--aa", "modality": "image",
         "help": "RandAugment rand-m9-n2-mstd0.5-inc1-p0.5-mmax10 (timm grammar), "
                 "trivialaugment (= rand-n1-m10-mstd101-inc1-p1), AutoAugment original|originalr"
                 " [-mstd0.5]; ops on the base view, fill = teacher mean, bilinear|bicubic",
         "view_params": [f"aa{{k}}_{f}" for f in augment.LAYER_FIELDS],
         "options": {"aa": None},
         "ops": [{"id": i, "name": n, "arg": OP_DOCS[n], "replay": same}
                 for i, n in enumerate(OPS)]},
        {"name": "--color-jitter", "modality": "image",
         "help": "torchvision ColorJitter(b, c, s) with b=c=s=strength, random order; off "
                 "with --aa (as timm); replay identical to ColorJitter with these params",
         "view_params": list(mix.CJ_FIELDS), "options": {"color_jitter": None}},
        {"name": "--reprob", "modality": "image",
         "help": "timm RandomErasing: rects identical; fill = timm's normalized fill "
                 "(const 0, rand per channel, pixel per pixel N(0,1) from re_seed) as uint8 "
                 "pixels: timm's values clipped to [0, 255] within rounding (>= 40 dB); "
                 "normals beyond the pixel range cannot be held by a uint8 view",
         "view_params": ["re{k}_t", "re{k}_l", "re{k}_h", "re{k}_w", "re_seed"],
         "options": {"reprob": 0.0, "remode": "pixel", "recount": 1}},
        {"name": "--mixup/--cutmix", "modality": "image",
         "help": "timm Mixup without a batch: --mixup-mode pair (cache default; rows paired "
                 "inside groups of 16 per view, one lam/box per pair, each pre-mix view made "
                 "once) or elem (partner row uniform); lam ~ Beta(alpha) and the CutMix box "
                 "(lam corrected to its area) drawn from (seed, sample, view); the partner's "
                 "own view params follow (p_*); CutMix identical, Mixup's uint8 rounding >= "
                 "40 dB; distill's CE uses lam*y + (1-lam)*y_partner",
         "view_params": list(mix.MIX_FIELDS) + ["p_..."],
         "options": {"mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0, "switch_prob": 0.5,
                     "mixup_mode": "pair"}},
    ]  # fmt: skip
