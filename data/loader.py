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


def use_batched(dataset, policy) -> bool:
    """Same-size in-RAM images with a policy that has a batched tensor path."""
    return (
        bool(getattr(dataset, "in_ram", False)) and dataset.modality == "image" and (policy.batched)
    )


def batched_views(dataset, policy, samples: np.ndarray, params: np.ndarray):
    """The in-thread path: one uint8 gather + the policy's batched apply."""
    return policy.apply(dataset.get(samples), torch.from_numpy(np.ascontiguousarray(params)))


class ViewMaker:
    """Picklable recipe shipped to the workers: dataset + policy (+ text collate). ``rows``
    maps cache rows to dataset samples (Mixup/CutMix partners are cache rows)."""

    def __init__(self, dataset, policy, text_collate=None, rows=None) -> None:
        if dataset.modality == "text" and text_collate is None:
            raise KdcacheError("a text dataset needs a tokenizer (text_collate)")
        self.dataset, self.policy, self.text = dataset, policy, text_collate
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def _partner(self, row: int, seen: dict):
        """Decode a partner row's original once per item."""
        if row not in seen:
            n = len(self.dataset) if self.rows is None else len(self.rows)
            if not 0 <= row < n:
                raise KdcacheError(f"mix partner row {row} is outside the {n} rows")
            seen[row] = self.dataset.load(int(row if self.rows is None else self.rows[row]))
        return seen[row]

    def draw(self, sample: int, seed: int, num_augs: int, identity_view: bool, raw=None):
        """Decode once, draw the A params (on the original size), cut the A views."""
        from kdcache.data.views import philox_uniforms, view_params_for

        raw = self.dataset.load(sample) if raw is None else raw
        sizes = psizes = None
        if self.policy.needs_size:
            sizes = np.array([[raw.height, raw.width]], dtype=np.float64)
        seen: dict = {}
        if getattr(self.policy, "mixes", False):  # partners first: their boxes need their size
            k = self.policy.num_uniforms
            u = philox_uniforms(seed, [sample], num_augs * k).reshape(num_augs, k)
            psizes = np.zeros((num_augs, 2))
            for a, r in enumerate(self.policy.partner_rows(u)):
                if r >= 0 and not (identity_view and a == 0):  # view 0: the eval view
                    im = self._partner(int(r), seen)
                    psizes[a] = (im.height, im.width)
        params = view_params_for(
            self.policy, seed, [sample], num_augs, identity_view, sizes, psizes
        )[0]
        return self.cut(raw, params, seen), params

    def replay(self, sample: int, params):
        """Decode once, cut the views of the stored ``params`` (k, P); ``("draw", seed, augs,
        num_augs)`` draws fresh views instead (training without a cache). Returns
        (views, params)."""
        raw = self.dataset.load(sample)
        if isinstance(params, tuple):  # ("draw", seed, augs, num_augs)
            _, seed, augs, num = params
            views, drawn = self.draw(sample, seed, num, False, raw)
            return views[list(augs)], drawn[list(augs)]
        params = np.asarray(params, dtype=np.float32)
        return self.cut(raw, params), params

    def cut(self, raw, params: np.ndarray, seen: dict | None = None):
        if self.dataset.modality == "text":
            return raw  # tokenized per batch in collate (dynamic padding)
        if getattr(self.policy, "mixes", False):
            seen = {} if seen is None else seen
            views = []
            for p in params:
                r = self.policy.partner_of(p)
                partner = None if r < 0 else self._partner(r, seen)
                views.append(self.policy.view(raw, p, partner).numpy())
        else:
            views = [self.policy.view(raw, p).numpy() for p in params]
        return torch.from_numpy(np.stack(views))  # numpy: no OpenMP team per small copy

    def collate(self, items: list[tuple]) -> dict:
        """items of (row, views-or-text, params (k, P)) -> one flat batch of all their views
        (k may differ per item); ``rows`` has one entry per item, ``counts`` its k."""
        rows = np.asarray([it[0] for it in items], dtype=np.int64)
        counts = [len(it[2]) for it in items]
        params = np.concatenate([np.asarray(it[2], dtype=np.float32) for it in items])
        flat = torch.from_numpy(params)
        if self.dataset.modality == "text":
            ids = self.text([it[1] for it in items])
            ids = ids.repeat_interleave(torch.tensor(counts), dim=0)
            views = self.policy.apply(ids, flat)
        else:
            views = torch.from_numpy(np.concatenate([it[1].numpy() for it in items]))
        return {"rows": rows, "counts": counts, "views": views, "params": params}


class _Rows(torch.utils.data.Dataset):
    """Stage-1 items: cache row -> (row, A views, A params) of sample ``order[row]``."""

    def __init__(self, maker: ViewMaker, order: np.ndarray, seed: int, a: int, ident: bool):
        self.maker, self.order, self.seed, self.a, self.ident = maker, order, seed, a, ident

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, row: int):
        views, params = self.maker.draw(int(self.order[row]), self.seed, self.a, self.ident)
        return int(row), views, params


def chunk_batches(ranges: Iterable[tuple[int, int]], rows_per_batch: int) -> list[list[int]]:
    """Row batches cut inside each chunk range (never straddling two chunks)."""
    out = []
    for start, stop in ranges:
        out += [
            list(range(lo, min(lo + rows_per_batch, stop)))
            for lo in range(start, stop, rows_per_batch)
        ]
    return out


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
        row, sample, params = item
        views, params = self.maker.replay(sample, params)
        return row, views, params


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
                mask_prob: float = 0.15, tokenizer=None, strong: dict | None = None):  # fmt: skip
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
    resolved = resolve_strong(strong, dataset, base, mean, std)
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


def row_order(dataset, seed: int) -> tuple[np.ndarray, dict | None]:
    """Cache row r holds sample ``order[r]``: a seeded permutation for streaming sources, so
    chunks (and chunk-aware batches) of a class-sorted folder are class-mixed; in-RAM sources
    keep their order. Returns (order, the spec's ``dataset.order`` entry or None)."""
    n = len(dataset)
    if getattr(dataset, "in_ram", False):
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
