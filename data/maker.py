"""``ViewMaker``: the picklable recipe the loader workers of both stages run — decode a
sample once, draw (stage 1) or take (stage 2) the params of its views, cut them; Mixup/CutMix
partners are decoded too, and a batch's rows share originals and pre-mix views (pair mode,
data/pairs.py)."""

from __future__ import annotations

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError


class ViewMaker:
    """Picklable recipe shipped to the workers: dataset + policy (+ text collate). ``rows``
    maps cache rows to dataset samples (Mixup/CutMix partners are cache rows)."""

    def __init__(self, dataset, policy, text_collate=None, rows=None) -> None:
        if dataset.modality == "text" and text_collate is None:
            raise KdcacheError("a text dataset needs a tokenizer (text_collate)")
        self.dataset, self.policy, self.text = dataset, policy, text_collate
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def _partner(self, row: int, seen: dict):
        """Decode a row's original once per item (or per batch: ``seen`` is shared)."""
        if row not in seen:
            n = len(self.dataset) if self.rows is None else len(self.rows)
            if not 0 <= row < n:
                raise KdcacheError(f"mix partner row {row} is outside the {n} rows")
            seen[row] = self.dataset.load(int(row if self.rows is None else self.rows[row]))
        return seen[row]

    def _row_of(self, sample: int) -> int:
        if self.rows is None:
            return int(sample)
        if getattr(self, "_inverse", None) is None:
            self._inverse = np.argsort(self.rows)
        return int(self._inverse[sample])

    def draw(self, sample: int, seed: int, num_augs: int, identity_view: bool, raw=None,
             row: int | None = None, seen: dict | None = None,
             memo: dict | None = None):  # fmt: skip
        """Decode once, draw the A params (on the original size), cut the A views. ``seen``
        / ``memo`` (originals / pre-mix views by row) may be shared by a batch's rows."""
        from kdcache.data.views import philox_uniforms, view_params_for

        seen = {} if seen is None else seen
        if getattr(self.policy, "pairs", False):  # pair mode: params depend on the rows
            return self.draw_rows([self._row_of(sample) if row is None else row], seed,
                                  num_augs, identity_view, seen, memo)[0]  # fmt: skip
        raw = self.dataset.load(sample) if raw is None else raw
        sizes = psizes = None
        if self.policy.needs_size:
            sizes = np.array([[raw.height, raw.width]], dtype=np.float64)
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
        return self.cut(raw, params, seen, row, memo), params

    def draw_rows(self, rows, seed: int, num_augs: int, identity_view: bool,
                  seen: dict | None = None, memo: dict | None = None) -> list[tuple]:  # fmt: skip
        """Pair-mode Mixup/CutMix (data/pairs.py): (views, params) of each cache row; rows
        of one batch share decoded originals and pre-mix views."""
        from kdcache.data.pairs import draw_pair_params

        seen = {} if seen is None else seen
        memo = {} if memo is None else memo
        order = np.arange(self.policy.strong["num_rows"]) if self.rows is None else self.rows

        def size_of(r: int) -> tuple[int, int]:
            im = self._partner(r, seen)
            return im.height, im.width

        params = draw_pair_params(self.policy, seed, rows, order, num_augs, identity_view,
                                  size_of)  # fmt: skip
        return [(self.cut(self._partner(int(r), seen), p, seen, int(r), memo), p)
                for r, p in zip(rows, params, strict=True)]  # fmt: skip

    def replay(self, sample: int, params, row: int | None = None, seen: dict | None = None,
               memo: dict | None = None):  # fmt: skip
        """Decode once, cut the views of the stored ``params`` (k, P); ``("draw", seed, augs,
        num_augs)`` draws fresh views instead (training without a cache). Returns
        (views, params)."""
        seen = {} if seen is None else seen
        raw = seen[row] if row is not None and row in seen else self.dataset.load(sample)
        if row is not None and getattr(self.policy, "mixes", False):
            seen[row] = raw  # a partner later in the batch reuses it
        if isinstance(params, tuple):  # ("draw", seed, augs, num_augs)
            _, seed, augs, num = params
            views, drawn = self.draw(sample, seed, num, False, raw, row, seen, memo)
            return views[list(augs)], drawn[list(augs)]
        params = np.asarray(params, dtype=np.float32)
        return self.cut(raw, params, seen, row, memo), params

    def cut(self, raw, params: np.ndarray, seen: dict | None = None, row: int | None = None,
            memo: dict | None = None):  # fmt: skip
        if self.dataset.modality == "text":
            return raw  # tokenized per batch in collate (dynamic padding)
        if getattr(self.policy, "mixes", False):
            seen = {} if seen is None else seen
            memo = {} if memo is None or row is None else memo  # shared only under a row key
            me = -1 if row is None else int(row)  # partners are rows >= 0

            def load(r):
                return raw if r == me else self._partner(int(r), seen)

            views = [self.policy.view_memo(me, p, load, memo) for p in params]
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
