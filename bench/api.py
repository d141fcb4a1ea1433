"""`kdcache.CachedDataset` in a plain DataLoader vs `kdcache distill`'s own loader (BatchMaker
+ epoch_batches) on the same cache: views/s of a warm epoch. Prints a table.

python bench/api.py [--n 1024] [--workers 2] [--batch-size 64] [--epochs 3] [--views one]
                    [--chunked]

--chunked: logits are not loaded into RAM (a cache bigger than RAM): CachedDataset reads
chunk by chunk in `kdcache.ChunkSampler` order (lanes = workers: each worker its own chunks),
distill's loader runs its chunk-aware plan.

Three sources: JPEGs decoded by worker processes (imagefolder, crop-flip on the eval view),
in-RAM 32x32 images (cifar100 layout, crop-flip), and texts (jsonl, token-mask views of a tiny
BERT teacher). Goal: CachedDataset >= 0.95x distill's. Text always needs ds.collate (it pads),
so its two api columns are two runs of the same loader.
`api` = no collate_fn (torch's default_collate, which batches CachedDataset items like
ds.collate), `api+collate` = `collate_fn=ds.collate`: one buffer per batch, handed over from a
worker through its shared-memory ring (data/handover.py). Runs alternate (api, api+collate, distill,
...); the best warm epoch of each counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _data(work: Path, n: int, sources: list[str]) -> dict[str, tuple[str, str]]:
    from bench.common import write_cifar100
    from tests.datatools import jpeg_bytes, sizes

    out = {}
    if "jpeg-folder" in sources:
        jpegs = work / "jpegs"
        for i, (w, h) in enumerate(sizes(n, seed=1)):
            d = jpegs / "train" / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:06d}.jpg").write_bytes(jpeg_bytes(w, h, i))
        out["jpeg-folder"] = ("imagefolder", str(jpegs))
    if "in-ram-32px" in sources:
        write_cifar100(work / "cifar", n)
        out["in-ram-32px"] = ("cifar100", str(work / "cifar"))
    if "text" in sources:
        import json

        import numpy as np

        from tests.datatools import tiny_bert

        words = ["good great fine nice happy", "bad awful poor sad grim", "table chair wall door"]
        rng = np.random.default_rng(0)
        rows = [(" ".join(rng.choice(words[i % 3].split(), size=3 + i % 20)), i % 3)
                for i in range(n)]  # fmt: skip
        (work / "texts.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
        )
        tiny_bert(work / "bert", [t for t, _ in rows])
        out["text"] = ("text", str(work / "texts.jsonl"))
    return out


def _cache(work: Path, name: str, dataset: str, root: str, workers: int) -> str:
    import kdcache

    teacher = {"teacher": f"hf:{work / 'bert'}", "augment": "token-mask"} if name == "text" \
        else {"teacher": "resnet8", "random_init": 0}  # fmt: skip
    return kdcache.precompute(
        **teacher, dataset=dataset, data_root=root, num_augs=4,
        out=str(work / f"{name}.zarr"), device="cpu", workers=workers, batch_size=128,
    )  # fmt: skip


def _api_epochs(path: str, workers: int, bs: int, epochs: int, packed: bool, views="one",
                chunked: bool = False):  # fmt: skip
    import kdcache
    import torch

    ds = kdcache.CachedDataset(path, views=views, memory_budget_gb=0 if chunked else 4)
    lanes = {"lanes": workers, "batch_size": bs} if workers > 1 else {}  # a worker: its chunks
    sampler = kdcache.ChunkSampler(ds, **lanes) if chunked else None
    dl = torch.utils.data.DataLoader(
        ds, batch_size=bs, shuffle=not chunked, sampler=sampler, num_workers=workers,
        drop_last=False, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        collate_fn=ds.collate if packed or ds.collate_text else None,  # text: always
    )  # fmt: skip
    rates = []
    for e in range(epochs):
        ds.set_epoch(e)
        if sampler is not None:
            sampler.set_epoch(e)
        t0, n = time.perf_counter(), 0
        for b in dl:
            n += b["teacher_logits"].shape[:-1].numel()  # views: K per item with views=K
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _distill_epochs(path: str, dataset: str, root: str, workers: int, bs: int, epochs: int,
                    views="one", chunked: bool = False):  # fmt: skip
    from kdcache.data.datasets import load_dataset
    from kdcache.data.views import get_policy
    from kdcache.distill.batches import BatchMaker, epoch_batches
    from kdcache.distill.teachers import CachedTeacher, open_caches

    ds = load_dataset(dataset, root=root, split="train")
    caches = open_caches([path], ds, caches_classes(path), None)
    teacher = CachedTeacher(caches, "same", "mean-logits", 0 if chunked else 4 << 30)
    spec = caches[0].spec
    if ds.modality == "text":  # as distill does: the cache's tokenizer, batched per batch
        import kdcache
        from kdcache.distill.setup import _tokenize

        files = kdcache.open_cache(path).tokenizer_files()
        _tokenize(ds, {"modality": "text", **spec.teacher, "tokenizer_files": files})
    policy = get_policy(spec.views["policy"], **(spec.views.get("params") or {}))
    make = BatchMaker(ds, policy, teacher, seed=0, workers=workers)
    rates = []
    for e in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in epoch_batches(make, len(ds), bs, 0, e, views, depth=2):
            n += len(b["labels"])  # one per view
        rates.append(n / (time.perf_counter() - t0))
    return rates


def caches_classes(path: str) -> int:
    import kdcache

    return kdcache.open_cache(path).num_classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--views", default="one", help='"one", "all" or K (views per item)')
    ap.add_argument("--chunked", action="store_true", help="logits read chunk by chunk")
    ap.add_argument("--sources", nargs="+", default=["jpeg-folder", "in-ram-32px", "text"],
                    choices=["jpeg-folder", "in-ram-32px", "text"])  # fmt: skip
    args = ap.parse_args()
    views = args.views if args.views in ("one", "all") else int(args.views)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'source':<12} {'api/s':>9} {'api+collate/s':>14} {'distill/s':>10} "
              f"{'api/distill':>12} {'api+collate/distill':>20}")  # fmt: skip
        for name, (dataset, root) in _data(work, args.n, args.sources).items():
            path = _cache(work, name, dataset, root, args.workers)
            api, packed, dist = [], [], []
            w, bs, ep = args.workers, args.batch_size, args.epochs
            for _ in range(args.rounds):  # alternate; warm epochs (after the first) count
                ck = args.chunked
                api += _api_epochs(path, w, bs, ep, False, views, ck)[1:]
                packed += _api_epochs(path, w, bs, ep, True, views, ck)[1:]
                dist += _distill_epochs(path, dataset, root, w, bs, ep, views, ck)[1:]
            a, p, d = max(api), max(packed), max(dist)
            print(f"{name:<12} {a:>9.0f} {p:>14.0f} {d:>10.0f} {a / d:>12.2f} {p / d:>20.2f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
