"""`kdcache.CachedDataset` and `kdcache.ChunkSampler`: a cache's replayed views and teacher
logits for any training loop (plain PyTorch, timm, Hugging Face Trainer).

An item is exactly what the teacher saw: the stored view params of (row, view) replayed on
the file by the cache's own view policy (the machinery of `kdcache distill`: data/loader.py,
data/views.py), with that view's cached logits. The view of "one" is a hash of (seed, epoch,
row) only (cache/epoch.choose_augs, the rule distill uses), so any sampler, worker count or
rank split gives the same (row, view) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from kdcache.cache.epoch import choose_augs
from kdcache.cache.errors import KdcacheError
from kdcache.data.handover import CachedItem, Items, collate_items, pack_batch


def load_cache_source(spec, provenance: dict, data_root: str | None = None, **columns):
    """The dataset a cache was computed on: `data_root`, else the root stage 1 read (its
    provenance); hfds/wds sources are located by data_root or the provenance's id/URL."""
    from kdcache.data.datasets import load_dataset

    name = spec.dataset["name"]
    if name in ("hfds", "wds"):
        where = data_root or str(provenance.get("dataset", "")).partition(":")[2]
        name, data_root = f"{name}:{where}", None
    else:
        data_root = data_root or provenance.get("data_root")
    return load_dataset(
        name, root=data_root, split=spec.dataset["split"], max_samples=spec.n, **columns
    )


def text_collate(spec, tokenizer_files):
    """The text teacher's tokenization (the tokenizer stored in the cache)."""
    from kdcache.data.text import TextCollate
    from kdcache.models.factory import load_tokenizer

    tok = load_tokenizer({"modality": "text", **spec.teacher, "tokenizer_files": tokenizer_files})
    return TextCollate(tok, spec.teacher["preprocessing"]["max_length"]), tok


def _views_mode(views: Any, num_views: int) -> int:
    """ "one" -> 1, "all" -> 0, K -> K (1 <= K <= A)."""
    if views in ("one", "all"):
        return 1 if views == "one" else 0
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise KdcacheError(f"views={views!r}: expected 'one', 'all' or a positive integer K")
    if views > num_views:
        raise KdcacheError(
            f"views={views} needs >= {views} cached views; the cache has {num_views}"
        )
    return int(views)


class CachedDataset(torch.utils.data.Dataset):
    """A torch Dataset of a cache's replayed views: item = {"input", "label",
    "teacher_logits" (float32), "row", "view"}.

    `input` is the exact view the teacher saw: a uint8 (3, H, W) image (float in [0, 1]
    only for an in-RAM source whose batched policy resizes), or for text a dict of
    `input_ids` / `attention_mask` (batch them with `collate_fn=dataset.collate`). views:
    "one" (len N; one cached view per row per epoch, chosen by (seed, epoch, row); by
    (seed, epoch, row // 16) in a pair-mode Mixup cache, whose pairs mix the same view), "all"
    (len N*A; item i is row i // A, view i % A) or K (len N; K views of one decoded row,
    inputs stacked (K, ...), as `distill --views K`). Call `set_epoch(e)` before each epoch
    (like DistributedSampler), before iterating the DataLoader: the epoch is in shared
    memory, so persistent workers replay the new epoch's views too.
    Data that does not match the cache's fingerprint is refused as `distill` refuses it.
    Teacher logits are read into RAM (checksum-verified) when they fit `memory_budget_gb`,
    else chunk by chunk: then use `ChunkSampler` so reads stay chunk-local."""

    def __init__(
        self,
        cache: Any,
        data_root: str | None = None,
        views: str | int = "one",
        seed: int = 0,
        *,
        storage_options: dict | None = None,
        memory_budget_gb: float = 4.0,
    ) -> None:
        from kdcache.cache.public import TeacherCache, open_cache
        from kdcache.data.loader import ViewMaker, match_rows, use_batched
        from kdcache.data.views import get_policy

        if not isinstance(cache, TeacherCache):
            cache = open_cache(cache, storage_options)
        self.cache, self.seed = cache, int(seed)
        # shared with DataLoader workers (also persistent ones): set_epoch reaches them
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        spec = cache.spec
        self.k = _views_mode(views, cache.num_views)
        self.views = views
        prov = cache.attrs.get("provenance") or {}
        so = {"storage_options": storage_options} if storage_options else {}
        self.source = load_cache_source(spec, prov, data_root, **so)
        self.rows = match_rows(cache.path, spec, lambda: cache.keys, self.source)
        self.policy = get_policy(spec.views["policy"], **(spec.views.get("params") or {}))
        self.collate_text = None
        self.pad_id = 0
        if self.source.modality == "text":
            self.collate_text, tok = text_collate(spec, cache.tokenizer_files())
            self.pad_id = tok.pad_token_id or 0
        self.maker = ViewMaker(self.source, self.policy, self.collate_text, rows=self.rows)
        self.mix_group = 0  # pair-mode Mixup/CutMix (data/pairs.py): views picked per group
        if getattr(self.policy, "pairs", False):
            self.mix_group = int(self.policy.strong["mix_group"])
        self.batched = use_batched(self.source, self.policy)
        self.labels = torch.as_tensor(cache.labels)
        if cache.nbytes() <= memory_budget_gb * (1 << 30):
            cache.load(None)

    def __len__(self) -> int:
        n = len(self.cache)
        return n * self.cache.num_views if self.k == 0 else n

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views "one" / K items replay (like DistributedSampler.set_epoch);
        the value lives in shared memory, so persistent DataLoader workers see it too."""
        self._epoch.fill_(int(epoch))

    def row_views(self, index: int) -> tuple[int, np.ndarray]:
        """(row, views) of item `index` this epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range 0..{len(self) - 1}")
        rows, views = self._rows_views(np.array([index], dtype=np.int64))
        return int(rows[0]), views.reshape(-1)

    def pair_adjacent(self, indices) -> np.ndarray:
        """``indices`` reordered so the two items of each Mixup/CutMix pair of a pair-mode
        cache sit side by side (a batch then makes each pre-mix view once); unchanged for
        other caches and for K views per item. ``ChunkSampler`` applies it."""
        idx = np.asarray(indices, dtype=np.int64)
        if not self.mix_group or self.k > 1 or not len(idx):
            return idx
        from kdcache.cache.epoch import pair_order

        rows, augs = self._rows_views(idx)
        fn = lambda r, v: self.policy.mix_of(self.cache.view_params(r, v))[0]  # noqa: E731
        return idx[pair_order(rows, augs, fn, self.cache.num_views)]

    def _batched(self, samples: np.ndarray, params: np.ndarray) -> torch.Tensor:
        """In-RAM images: one gather + the policy's batched replay, uint8 where no resize is
        involved (the exact bytes distill's float [0,1] views are made of), else float."""
        raw = self.source.get(samples)
        p = torch.from_numpy(params)
        x = self.policy.apply_uint8(raw, p)
        return self.policy.apply(raw, p) if x is None else x

    def _replay(self, row: int, params: np.ndarray, seen=None, memo=None):
        sample = int(self.rows[row])
        if self.batched:
            return self._batched(np.full(len(params), sample), params)
        views, _ = self.maker.replay(sample, params, row, seen, memo)
        if self.collate_text is not None:
            ids = self.collate_text([views]).repeat(len(params), 1)
            return self.policy.apply(ids, torch.from_numpy(params))
        return views

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(index)

    def _item(self, index: int, seen=None, memo=None) -> dict[str, Any]:
        row, views = self.row_views(int(index))
        params = np.ascontiguousarray(self.cache.view_params(row, views), dtype=np.float32)
        x = self._replay(row, params, seen, memo)
        t = torch.from_numpy(self.cache.logits_numpy(row, views))
        item = {"input": x, "label": self.labels[row], "teacher_logits": t, "row": row}
        item = item if self.collate_text is not None else CachedItem(item)
        item["view"] = torch.as_tensor(views)
        if getattr(self.policy, "mixes", False):  # Mixup/CutMix: partner label and λ
            partners, lam = self.policy.mix_of(params)
            item["mix_label"] = self.labels[torch.from_numpy(np.maximum(partners, 0))]
            item["mix_lam"] = torch.from_numpy(np.asarray(lam, dtype=np.float32))
        if self.k in (0, 1):  # one view per item: no K axis
            for key in ("teacher_logits", "view", "mix_label", "mix_lam"):
                if key in item:
                    item[key] = item[key][0]
            item["input"] = {k: v[0] for k, v in x.items()} if isinstance(x, dict) else x[0]
        return item

    def __getitems__(self, indices: list[int]) -> Sequence[dict[str, Any]]:
        """A batch of items read together (what DataLoader calls with batch_size): one
        gather of logits, params and views, and for in-RAM images one batched replay (all
        views modes); items are equal to `[self[i] for i in indices]`."""
        if getattr(self.policy, "mixes", False) or (self.k > 1 and self.collate_text is not None):
            seen: dict = {}  # originals and pre-mix views shared by the batch (Mixup pairs)
            memo: dict = {}
            return [self._item(i, seen, memo) for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range 0..{len(self) - 1}")
        rows, views = self._rows_views(idx)  # views (B,), or (B, K) for K views per item
        k = 1 if views.ndim == 1 else views.shape[1]
        flat_rows, flat_views = np.repeat(rows, k), views.reshape(-1)
        params = self.cache.view_params(flat_rows, flat_views)
        params = np.ascontiguousarray(params, dtype=np.float32)
        lengths = None
        if self.collate_text is not None:
            x, lengths = self._text_input(rows, params)
        elif self.batched:
            x = self._batched(self.rows[flat_rows], params)
            x = x.reshape(len(rows), k, *x.shape[1:]) if views.ndim == 2 else x
        else:  # decoded per row, as distill's workers do
            x = [self.maker.replay(int(self.rows[r]), params[j * k : (j + 1) * k])[0]
                 for j, r in enumerate(rows)]  # fmt: skip
            x = x if views.ndim == 2 else [v[0] for v in x]
            x = torch.stack(x) if len({v.shape for v in x}) == 1 else x  # else sizes differ
        logits = torch.from_numpy(self.cache.logits_numpy(flat_rows, flat_views))
        batch = {
            "input": x,
            "label": self.labels[torch.from_numpy(rows)],
            "teacher_logits": logits.reshape(*views.shape, -1),
            "row": torch.from_numpy(rows),
            "view": torch.from_numpy(views),
        }
        return Items(batch, lengths)

    def _rows_views(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, views) of items `idx` this epoch, batched `row_views`."""
        a = self.cache.num_views
        if self.k == 0:
            return idx // a, idx % a
        by = idx // self.mix_group if self.mix_group else idx
        start = choose_augs(self.seed, self.epoch, by, a)
        return idx, start if self.k == 1 else (start[:, None] + np.arange(self.k)) % a

    def _text_input(self, rows: np.ndarray, params: np.ndarray) -> tuple[dict, list[int]]:
        """Text inputs of a batch, padded to the longest, and each text's length: one
        tokenizer call and one batched replay of the policy, which is batch-independent
        (data/text.TextCollate: per-position seeded scores, pads never masked), so an item
        cut back to its own length equals `self[i]`; `collate` takes the padded batch."""
        seqs = self.collate_text.token_lists([self.source.load(int(self.rows[r])) for r in rows])
        lengths = [len(seq) for seq in seqs]
        ids = np.full((len(seqs), max(lengths, default=0)), self.pad_id, dtype=np.int64)
        for j, seq in enumerate(seqs):
            ids[j, : lengths[j]] = seq
        return self.policy.apply(torch.from_numpy(ids), torch.from_numpy(params)), lengths

    def collate(self, items: list[dict]) -> dict[str, Any]:
        """Batch items (`DataLoader(ds, collate_fn=ds.collate)`). Images: default_collate's
        batch, every tensor a view of one buffer that a worker hands over in one piece
        (data/handover.py; default_collate does the same for image items). Text: inputs
        padded to the longest (as distill's batches are), in one buffer too."""
        if self.collate_text is None:
            return collate_items(items)
        if isinstance(items, Items):  # a batch cut whole: its inputs are padded already
            return pack_batch({k: v for k, v in items.batch.items() if k != "input"}
                              | {"input": items.batch["input"]})  # fmt: skip
        out = {k: torch.stack([torch.as_tensor(it[k]) for it in items])
               for k in items[0] if k != "input"}  # fmt: skip  # = default_collate's
        for key in items[0]["input"]:
            seqs = [it["input"][key] for it in items]
            flat = [s.reshape(-1, s.shape[-1]) for s in seqs]
            length = max(f.shape[-1] for f in flat)
            fill = self.pad_id if key == "input_ids" else 0
            pad = torch.nn.functional.pad
            padded = [pad(f, (0, length - f.shape[-1]), value=fill) for f in flat]
            out.setdefault("input", {})[key] = torch.stack(
                [p.reshape(*s.shape[:-1], length) for p, s in zip(padded, seqs, strict=True)]
            )
        return pack_batch(out)  # one buffer: one hand-over from a worker
