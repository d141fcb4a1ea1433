"""The loader of both stages: a torch ``DataLoader`` whose worker *processes* decode each
sample once and cut all of its views (uint8; the model converts to float on the device).

Stage 1 (``precompute_loader``): an item is one cache row; the worker decodes the original,
draws the params of all A views (they may need the original size) and cuts them. Batches
are lists of whole rows of one chunk (``chunk_batches``), so they never straddle chunks.
Stage 2 (``ReplayLoader``): an item is (sample, stored params of k views); a batch plan
comes from the main process (the epoch order, teacher logits) and is fed through a sampler,
so order, views and bytes are the same for any worker count. In-RAM datasets with a batched
policy (CIFAR crop-flip) keep the in-thread batched tensor path (``batched_views``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data.maker import ViewMaker


def use_batched(dataset, policy) -> bool:
    """Same-size in-RAM images with a policy that has a batched tensor path."""
    return (
        bool(getattr(dataset, "in_ram", False)) and dataset.modality == "image" and (policy.batched)
    )


def batched_views(dataset, policy, samples: np.ndarray, params: np.ndarray):
    """The in-thread path: one uint8 gather + the policy's batched apply."""
    return policy.apply(dataset.get(samples), torch.from_numpy(np.ascontiguousarray(params)))


class _Rows(torch.utils.data.Dataset):
    """Stage-1 items: cache row -> (row, A views, A params) of sample ``order[row]``."""

    def __init__(self, maker: ViewMaker, order: np.ndarray, seed: int, a: int, ident: bool):
        self.maker, self.order, self.seed, self.a, self.ident = maker, order, seed, a, ident

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, row: int):
        views, params = self.maker.draw(int(self.order[row]), self.seed, self.a, self.ident,
                                        row=int(row))  # fmt: skip
        return int(row), views, params

    def __getitems__(self, rows: list[int]) -> list[tuple]:
        """A batch of rows: pair-mode mixing makes a pair's pre-mix views once."""
        if not getattr(self.maker.policy, "pairs", False):
            return [self[r] for r in rows]
        got = self.maker.draw_rows(rows, self.seed, self.a, self.ident)
        return [(int(r), v, p) for r, (v, p) in zip(rows, got, strict=True)]


def chunk_batches(ranges: Iterable[tuple[int, int]], rows_per_batch: int,
                  align: int = 1) -> list[list[int]]:  # fmt: skip
    """Row batches cut inside each chunk range (never straddling two chunks); ``align`` > 1:
    batches end on multiples of ``rows_per_batch`` rounded up to ``align`` rows (whole
    pair-mode Mixup groups)."""
    out = []
    step = max(1, rows_per_batch)
    step = -(-step // align) * align
    for start, stop in ranges:
        lo = start
        while lo < stop:
            hi = min(stop, lo + step if align == 1 else (lo // step + 1) * step)
            out.append(list(range(lo, hi)))
            lo = hi
    return out


def mix_align(policy) -> int:
    """Stage-1 batch alignment of a policy: whole pair-mode Mixup groups, else 1."""
    from kdcache.data.pairs import GROUP

    return GROUP if getattr(policy, "pairs", False) else 1


def clean_errors(it: Iterable) -> Iterator:
    """Re-raise a worker's KdcacheError as its own one line (DataLoader wraps it in a
    traceback text), so bad input stays one ``error:`` line."""
    try:
        yield from it
    except KdcacheError as e:
        msg = str(e)
        if "Original Traceback" in msg:
            last = msg.strip().splitlines()[-1]
            msg = last.split("KdcacheError: ", 1)[-1]
        raise KdcacheError(msg) from None


def loader_kwargs(workers: int, pin: bool) -> dict:
    """Worker processes, persistent across epochs/chunks, pinned memory on CUDA."""
    kw: dict = {"num_workers": max(0, int(workers)), "pin_memory": bool(pin)}
    if kw["num_workers"] > 0:
        kw.update(persistent_workers=True, prefetch_factor=4, multiprocessing_context="fork")
    return kw


def precompute_loader(maker: ViewMaker, order: np.ndarray, seed: int, num_augs: int,
                      identity_view: bool, batches: list[list[int]], workers: int = 0,
                      pin: bool = False) -> torch.utils.data.DataLoader:  # fmt: skip
    """Stage-1 DataLoader over ``batches`` of cache rows (see module docstring)."""
    ds = _Rows(maker, np.asarray(order, dtype=np.int64), seed, num_augs, identity_view)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=batches, collate_fn=maker.collate, **loader_kwargs(workers, pin)
    )


class _Replay(torch.utils.data.Dataset):
    """Stage-2 items: (row, sample, params (k, P)) -> (row, k views, params)."""

    def __init__(self, maker: ViewMaker) -> None:
        self.maker = maker

    def __len__(self) -> int:
        return 0  # items are planned by the sampler, never enumerated

    def __getitem__(self, item):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list) -> list[tuple]:
        """A batch: rows share decoded originals and pre-mix views (Mixup/CutMix pairs)."""
        seen: dict = {}
        memo: dict = {}
        out = []
        for row, sample, params in items:
            views, params = self.maker.replay(sample, params, row, seen, memo)
            out.append((row, views, params))
        return out


class _PlanSampler:
    """Yields the item lists of the current plan; remembers each batch's extra data."""

    def __init__(self) -> None:
        self.plan: Iterator | None = None
        self.extras: collections.deque = collections.deque()

    def __iter__(self):
        plan, self.plan = self.plan, None
        for items, extra in plan or ():
            self.extras.append(extra)
            yield items


class ReplayLoader:
    """Stage-2 views of planned batches through persistent worker processes."""

    def __init__(self, maker: ViewMaker, workers: int = 0, pin: bool = False) -> None:
        self.sampler = _PlanSampler()
        self.loader = torch.utils.data.DataLoader(
            _Replay(maker), batch_sampler=self.sampler, collate_fn=maker.collate,
            **loader_kwargs(workers, pin),
        )  # fmt: skip

    def run(self, plan: Iterable[tuple[list, object]]) -> Iterator[tuple[dict, object]]:
        """``plan`` yields (items, extra); items = [(row, sample, params (k, P)), ...]."""
        self.sampler.extras.clear()
        self.sampler.plan = iter(plan)
        for batch in clean_errors(self.loader):
            yield batch, self.sampler.extras.popleft()


TEXT_POLICIES = ("identity", "token-mask")


def make_policy(name: str, dataset, info: dict, image_size: int | None = None,
                mask_prob: float = 0.15, tokenizer=None, strong: dict | None = None,
                cached: bool = True):  # fmt: skip
    """The view policy of a run for this dataset and (teacher) model.

    Images: the view size defaults to the model's ``input_size``; the identity view is the
    model's eval transform (resize to size/crop_pct, center crop, its interpolation) for
    native-resolution sources; in-RAM 32x32 sources keep their raw-tensor identity and
    crop-flip (the fast batched path, unchanged bytes). Text: identity or token-mask.
    ``strong``: the --aa/--color-jitter/--reprob/--mixup... options (data/strong.py).
    """
    base = _base_policy(name, dataset, info, image_size, mask_prob, tokenizer)
    if strong is None:
        return base
    from kdcache.data.strong import StrongPolicy, resolve_strong

    pre = info.get("preprocessing") or {}
    mean, std = pre.get("mean", (0.485, 0.456, 0.406)), pre.get("std", (0.229, 0.224, 0.225))
    resolved = resolve_strong(strong, dataset, base, mean, std, cached)
    return base if resolved is None else StrongPolicy(base, resolved)


def _base_policy(name, dataset, info, image_size, mask_prob, tokenizer):
    from kdcache.data.views import get_policy

    if dataset.modality == "text":
        if name not in TEXT_POLICIES:
            raise KdcacheError(
                f"--augment {name!r} is not a text policy; expected one of "
                f"{', '.join(TEXT_POLICIES)}"
            )
        if name == "token-mask":
            return get_policy(name, tokenizer=tokenizer, p=mask_prob)
        pad = getattr(tokenizer, "pad_token_id", None)
        return get_policy(name, pad_id=pad or 0)
    pre = info["preprocessing"]
    size = [int(image_size)] * 2 if image_size else [int(v) for v in pre["input_size"][-2:]]
    ev = {"size": size, "crop_pct": pre.get("crop_pct", 1.0), "interpolation": pre.get(
        "interpolation", "bilinear")}  # fmt: skip
    if name == "rrc-flip":
        return get_policy(name, size=size, eval=ev)
    if getattr(dataset, "in_ram", False) and name in ("identity", "crop-flip"):
        return get_policy(name)
    return get_policy(name, eval=ev)


def row_order(dataset, seed: int, permute: bool = False) -> tuple[np.ndarray, dict | None]:
    """Cache row r holds sample ``order[r]``: a seeded permutation for streaming sources, so
    chunks (and chunk-aware batches) of a class-sorted folder are class-mixed; in-RAM sources
    keep their order unless ``permute`` (pair-mode Mixup groups consecutive rows). Returns
    (order, the spec's ``dataset.order`` entry or None)."""
    n = len(dataset)
    if getattr(dataset, "in_ram", False) and not permute:
        return np.arange(n, dtype=np.int64), None
    rng = np.random.Generator(np.random.Philox(key=(int(seed) & ((1 << 64) - 1)) | (7 << 64)))
    return rng.permutation(n).astype(np.int64), {"kind": "permutation", "seed": int(seed)}


def rows_to_samples(cache_keys: list[str], dataset) -> np.ndarray:
    """Dataset index of every cache row, through the stored keys (any row order)."""
    index = {k: i for i, k in enumerate(dataset.keys)}
    out = np.empty(len(cache_keys), dtype=np.int64)
    for r, k in enumerate(cache_keys):
        i = index.get(str(k))
        if i is None:
            raise KdcacheError(f"cache row {r} has key {k!r}, which the dataset does not have")
        out[r] = i
    return out


def ordered_fingerprint(dataset, order: np.ndarray | None) -> str:
    """The dataset fingerprint of a cache's rows: keys + labels in row order."""
    from kdcache.cache.spec import dataset_fingerprint

    if order is None:
        return dataset.fingerprint()
    labels = np.asarray(dataset.labels, dtype=np.int64)[order]
    return dataset_fingerprint([dataset.keys[i] for i in order], labels)


def cache_rows(spec_dataset: dict, cache_keys, dataset) -> tuple[np.ndarray, bool]:
    """(dataset index of every cache row, whether the rows match this dataset): rows map to
    samples through the stored keys when the cache has a row order, else row == sample."""
    if not spec_dataset.get("order"):
        n = len(dataset)
        return np.arange(n, dtype=np.int64), dataset.fingerprint() == spec_dataset.get(
            "fingerprint"
        )
    try:
        rows = rows_to_samples(cache_keys(), dataset)
    except KdcacheError:
        return np.empty(0, np.int64), False
    return rows, ordered_fingerprint(dataset, rows) == spec_dataset.get("fingerprint")


def match_rows(path: str, spec, cache_keys, dataset) -> np.ndarray:
    """The dataset index of every cache row; KdcacheError (distill's message, with a hint)
    when the dataset given is not the one the cache was computed on (size or fingerprint)."""
    name, split = spec.dataset.get("name"), spec.dataset.get("split")
    hint = (
        f"; pass --dataset {name} (and its --data-root)"
        if name and name != dataset.name
        else "; check --data-root, --split and --max-samples"
    )
    if spec.n != len(dataset):
        raise KdcacheError(
            f"cache {path} was computed on {name}/{split} with N={spec.n} samples but the dataset "
            f"given, {dataset.name}/{dataset.split}, has {len(dataset)}{hint}"
        )
    rows, same = cache_rows(spec.dataset, cache_keys, dataset)
    if not same:
        raise KdcacheError(
            f"cache {path} was computed on another {name}/{split} (fingerprint "
            f"{spec.dataset.get('fingerprint', '')[:12]} does not match the keys and "
            f"labels of {dataset.name}/{dataset.split}){hint}"
        )
    return rows
