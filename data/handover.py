"""Batches of a `CachedDataset` packed into one buffer, and handed from a DataLoader
worker to the main process cheaply.

torch sends a tensor made in a worker through a new shared-memory segment whose file
descriptor the main process fetches over an authenticated socket connection to the worker,
one per storage per batch: ~1.3 ms on 2 cores, more than cutting a whole 32 px batch. A
batch packed into one buffer of at most `PIPE_BYTES` is therefore pickled by value and
crosses the worker's result pipe like any small object (three memcpys: ~10 us per 200 kB);
bigger batches keep torch's shared memory, where the descriptor's cost is amortized.
Measured in bench/api.py (in-RAM 32 px rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data._utils.collate import default_collate_fn_map

PIPE_BYTES = 4 << 20


def views(buf: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    """The tensors of `layout` ({key: (offset, shape, dtype, nbytes)}) over `buf`."""
    return {k: buf[o : o + n].view(dt).view(shape) for k, (o, shape, dt, n) in layout.items()}


def layout_of(cols: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[dict, int]:
    """64-byte aligned layout of columns {key: (shape, dtype)} in one buffer, and its size."""
    layout, size = {}, 0
    for k, (shape, dt) in cols.items():
        nbytes = math.prod(shape) * dt.itemsize
        layout[k] = (size, tuple(shape), dt, nbytes)
        size += -(-nbytes // 64) * 64
    return layout, size


def new_buffer(size: int) -> tuple[torch.Tensor, bool]:
    """(buffer, by_value): inside a DataLoader worker, a batch of at most PIPE_BYTES goes
    by value (wrap it in `ByValue`), a bigger one in one shared-memory segment."""
    buf = torch.empty(size, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is None:
        return buf, False
    if size > PIPE_BYTES:
        return buf.share_memory_(), False
    return buf, True


class ByValue(dict):
    """A dict of tensors over one buffer that pickles as the buffer's bytes; unpickled, a
    plain dict of writable tensors over one fresh buffer."""

    def __init__(self, out: dict, buf: torch.Tensor, layout: dict) -> None:
        super().__init__(out)
        self._buf, self._layout = buf, layout

    def __reduce__(self):
        return _from_bytes, (self._buf.numpy().tobytes(), self._layout)


def _from_bytes(data: bytes, layout: dict) -> dict[str, torch.Tensor]:
    return views(torch.frombuffer(bytearray(data), dtype=torch.uint8), layout)


class CachedItem(dict):
    """An image item of a `CachedDataset` (a plain dict to the user). torch's
    `default_collate` batches it like `CachedDataset.collate` (registered in its
    `default_collate_fn_map`, the extension point torch documents), so a DataLoader without
    `collate_fn` gets the one-buffer batch too."""


def collate_items(items, *, collate_fn_map=None) -> dict[str, torch.Tensor]:
    """`packed_collate`, or for a batch cut whole by `__getitems__`, that batch packed as is."""
    if isinstance(items, Items) and isinstance(items.batch["input"], torch.Tensor):
        return _pack({k: [v] for k, v in items.batch.items()}, cat=True)
    return packed_collate(items)


default_collate_fn_map[CachedItem] = collate_items


class Items(Sequence):
    """`__getitems__`'s items as a sequence over the batch they were cut from: `collate`
    packs that batch as it is; the per-item dicts (what default_collate and users index)
    are made on first access only. `input` is a list when the views differ in size."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch
        self._items: list[CachedItem | None] = [None] * len(batch["row"])

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        it = self._items[i]
        if it is None:  # made on first access (default_collate looks at item 0 only)
            it = CachedItem((k, v[i]) for k, v in self.batch.items())
            it["row"] = int(it["row"])  # a plain int, as __getitem__ gives
            self._items[i] = it
        return it

    def __repr__(self) -> str:
        return repr(list(self))


def packed_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """default_collate for dicts of tensors/numbers, the stacked tensors laid out in ONE
    uint8 buffer (64-byte aligned views; in shared memory inside a DataLoader worker)."""
    return _pack({k: [torch.as_tensor(it[k]) for it in items] for k in items[0]})


def _pack(cols: dict[str, list[torch.Tensor]], cat: bool = False) -> dict[str, torch.Tensor]:
    """Each column stacked (or, `cat`, concatenated) into a view of one buffer, which a
    DataLoader worker hands over in one piece (`new_buffer`)."""
    lead = {k: sum(len(t) for t in v) if cat else len(v) for k, v in cols.items()}
    layout, size = layout_of(
        {k: ((lead[k], *v[0].shape[int(cat) :]), v[0].dtype) for k, v in cols.items()}
    )
    buf, by_value = new_buffer(size)
    out = views(buf, layout)
    for k, t in out.items():
        (torch.cat if cat else torch.stack)(cols[k], out=t)
    return ByValue(out, buf, layout) if by_value else out
