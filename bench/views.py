"""Throughput of the batched view policies on one CPU thread (images/s), vs. per-image torchvision.

python bench/views.py [--batch 256] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.data.views import get_policy, view_params_for  # noqa: E402

log = logging.getLogger("bench.views")


def rate(fn: Callable[[], object], n_images: int, seconds: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += n_images
    return done / (time.perf_counter() - start)


def torchvision_per_image(raw: torch.Tensor) -> Callable[[], object]:
    """The usual per-sample pipeline, for the ratio: PIL-free tensor transforms, one by one."""
    from torchvision.transforms import v2

    t = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return lambda: [t(img) for img in raw]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    b = args.batch
    raw32 = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8)
    raw64 = torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8)
    cases = []
    crop = get_policy("crop-flip", pad=4)
    p = torch.from_numpy(view_params_for(crop, 0, np.arange(b), 1, False)[:, 0])
    cases.append(("crop-flip 32x32", lambda: crop.apply(raw32, p)))
    from PIL import Image

    for src, size in ((raw32, 32), (raw64, 64), (raw64, 224)):  # per sample on the original
        rrc = get_policy("rrc-flip", size=size)
        hw = np.array([src.shape[-2:]] * b)
        q = view_params_for(rrc, 0, np.arange(b), 1, False, hw)[:, 0]
        imgs = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in src]

        def per_sample(r=rrc, imgs=imgs, q=q):
            return [r.view(im, p) for im, p in zip(imgs, q, strict=True)]

        cases.append((f"rrc-flip {src.shape[-1]}->{size}", per_sample))
    cases.append(("torchvision per-image crop+flip 32x32", torchvision_per_image(raw32)))
    results = {name: rate(fn, b, args.seconds) for name, fn in cases}
    for name, r in results.items():
        log.info("%-40s %10.0f images/s (batch %d, 1 thread)", name, r, b)
    base = results["torchvision per-image crop+flip 32x32"]
    log.info(
        "crop-flip speed-up vs per-image torchvision: %.1fx", results["crop-flip 32x32"] / base
    )
    start = time.perf_counter()
    view_params_for(get_policy("rrc-flip"), 0, np.arange(50_000), 8, True, [[375, 500]] * 50_000)
    log.info("view_params_for rrc-flip 50k x 8: %.2f s", time.perf_counter() - start)
    start = time.perf_counter()
    view_params_for(crop, 0, np.arange(50_000), 8, True)
    log.info("view_params_for crop-flip 50k x 8: %.2f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
