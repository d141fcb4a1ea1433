"""View making with strong augmentation: kdcache's stage 1 (draw + cut) and stage 2 (replay)
vs timm's own transform pipeline, on the same JPEG files, same DataLoader worker setup.
Not a test.

    .venv/bin/python bench/strong.py [--n 192] [--workers 0] [--augs 1,4] [--repeats 3]

timm: ``create_transform(224, is_training=True, auto_augment=rand-m9-mstd0.5-inc1,
re_prob=0.25, re_mode=pixel)`` per sample in the loader, then ``Mixup(0.8, cutmix 1.0,
switch 0.5)`` on each batch of 64 (timm's train loop). kdcache: rrc-flip + the same --aa,
--reprob, --mixup/--cutmix views (uint8), A views per decoded row. ``pair`` (the cache
default, data/pairs.py): the two views of a pair share their pre-mix views (stage 1 makes a
group's views together; stage 2 is planned as distill plans it, pairs side by side); ``elem``:
each mixed view decodes and augments its partner too. Rates are views/s, best of --repeats
passes, in CPU seconds of this process with --workers 0 (robust on a shared machine), else
wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_jpegs  # noqa: E402

PRE = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bilinear",
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
STRONG = {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel", "mixup": 0.8,
          "cutmix": 1.0, "mixup_prob": 1.0, "switch_prob": 0.5}  # fmt: skip


CLOCK = [time.perf_counter]  # process_time with --workers 0 (the machine may be shared)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, transform) -> None:
        self.paths, self.t = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.t(im.convert("RGB")), 0


def _timm_posterize_fix() -> None:
    """timm's Posterize raises at 0 bits under Pillow >= 10 (magnitude 10 after mstd noise);
    clamp to 1 bit for the bench (same cost; kdcache makes such a view black)."""
    import timm.data.auto_augment as taa

    orig = taa.posterize
    if getattr(orig, "clamped", False):
        return

    def posterize(img, bits_to_keep, **kw):
        return orig(img, max(1, bits_to_keep), **kw)

    posterize.clamped = True
    for k, v in list(taa.NAME_TO_OP.items()):
        if v is orig:
            taa.NAME_TO_OP[k] = posterize


def timm_pass(paths, workers: int) -> float:
    from timm.data import Mixup, create_transform

    _timm_posterize_fix()

    t = create_transform(224, is_training=True, auto_augment=STRONG["aa"], re_prob=0.25,
                         re_mode="pixel", interpolation="bilinear", mean=PRE["mean"],
                         std=PRE["std"])  # fmt: skip
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, num_classes=10)
    kw = {"multiprocessing_context": "fork"} if workers else {}
    dl = torch.utils.data.DataLoader(_Files(paths, t), batch_size=64, num_workers=workers, **kw)
    start = CLOCK[0]()
    for x, y in dl:
        if len(x) % 2 == 0:
            mixer(x, y)
    return len(paths) / (CLOCK[0]() - start)


def kdcache_passes(root: Path, workers: int, augs: int, mixing: str) -> tuple[float, float]:
    """(stage-1 views/s, stage-2 views/s)."""
    from kdcache.data import loader as L
    from kdcache.data.datasets import load_dataset

    ds = load_dataset("imagefolder", root=str(root), split="train")
    strong = {**STRONG, "mixup_mode": mixing} if mixing else {"aa": STRONG["aa"], "reprob": 0.25}
    policy = L.make_policy("rrc-flip", ds, {"preprocessing": PRE}, strong=strong)
    n = len(ds)
    order = np.arange(n)
    maker = L.ViewMaker(ds, policy, rows=order)
    batches = L.chunk_batches([(0, n)], max(1, 64 // augs), L.mix_align(policy))
    start = CLOCK[0]()
    params = []
    for b in L.precompute_loader(maker, order, 0, augs, False, batches, workers=workers):
        params.append(b["params"])
    s1 = n * augs / (CLOCK[0]() - start)
    flat = np.concatenate(params).reshape(n, augs, -1)
    # stage 2: one stored view per sample per epoch, planned as distill plans it (pair-mode
    # Mixup: views picked per group of rows, the two views of a pair side by side)
    from kdcache.distill.batches import plan_epoch

    group, fn = 0, None
    if getattr(policy, "pairs", False):
        group, fn = policy.strong["mix_group"], (lambda r, a: policy.partners_in(flat, r, a))
    plan = [([(int(r), int(r), flat[r, a][None]) for r, a in zip(s, v, strict=True)], None)
            for s, v in plan_epoch(n, augs, 64, 0, 0, "one", 1, group, fn)]  # fmt: skip
    loader = L.ReplayLoader(maker, workers)
    start = CLOCK[0]()
    for _ in loader.run(iter(plan)):
        pass
    s2 = n / (CLOCK[0]() - start)
    return s1, s2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--size", type=int, default=320, help="JPEG side (square originals)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--augs", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="pair,elem", help="Mixup modes to time (pair, elem)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.workers == 0:
        CLOCK[0] = time.process_time
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.n, size=args.size, classes=10)
        paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
        timm_rate = max(timm_pass(paths, args.workers) for _ in range(args.repeats))
        rows = []
        for a in [int(v) for v in args.augs.split(",")]:
            for mixing in [*args.modes.split(","), ""]:
                runs = [kdcache_passes(root, args.workers, a, mixing) for _ in range(args.repeats)]
                rows.append((a, mixing, max(r[0] for r in runs), max(r[1] for r in runs)))
    print(f"{args.n} JPEGs {args.size}x{args.size} -> 224, workers {args.workers}, "
          f"torch threads 1, best of {args.repeats}, "
          f"{'CPU' if args.workers == 0 else 'wall'} time")  # fmt: skip
    print(f"timm create_transform(RA+RE) + Mixup/CutMix        {timm_rate:8.1f} views/s   1.00x")
    for a, mixing, s1, s2 in rows:
        what = f"RA+RE+Mixup/CutMix {mixing:4}" if mixing else "RA+RE (no mixing)       "
        print(f"kdcache {what} A={a:<2} stage 1 {s1:8.1f} views/s {s1 / timm_rate:5.2f}x"
              f"   stage 2 {s2:8.1f} views/s {s2 / timm_rate:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
