"""Batches of a `CachedDataset` packed into one buffer, and handed from a DataLoader
worker to the main process cheaply.

torch sends a tensor made in a worker through a new shared-memory segment whose file
descriptor the main process fetches over an authenticated socket connection to the worker,
one per storage per batch: ~1.3 ms on 2 cores, more than cutting a whole 32 px batch. Pickled
by value, a 200 kB batch crosses the worker's 64 kB result pipe in pieces (~0.2 ms of the
main process's time per batch). So each worker packs its batches (up to `RING_BYTES`) into
the slots of one shared-memory ring, made once; the main process maps it once (the first
messages carry it) and then receives only (slot, layout): it copies the batch out into a
fresh buffer and frees the slot. A worker whose ring is full or cannot be made (no space in
/dev/shm) hands the batch over by value (up to `PIPE_BYTES`), bigger batches in torch's
shared memory. Measured in bench/api.py (in-RAM 32 px rows).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data._utils.collate import default_collate_fn_map

PIPE_BYTES = 4 << 20  # biggest batch pickled by value when the ring is full
RING_SLOTS = 6  # > DataLoader's prefetch_factor: a worker's batches in flight
RING_BYTES = 4 << 20  # biggest batch a ring slot holds (RING_SLOTS * this in /dev/shm)
RING_MIN_SLOT, RING_ROUND = 256 << 10, 64 << 10  # slot size: the batch's, rounded up


def views(buf: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    """The tensors of `layout` ({key: (offset, shape, dtype, nbytes)}) over `buf` (its
    storage: set_ is one call where slice + view + view are three); a key (outer, inner)
    is out[outer][inner] (text inputs)."""
    st, base = buf.untyped_storage(), buf.storage_offset()
    out: dict = {}
    for k, (o, shape, dt, _) in layout.items():
        t = torch.empty(0, dtype=dt).set_(st, (base + o) // dt.itemsize, shape)
        if isinstance(k, tuple):
            out.setdefault(k[0], {})[k[1]] = t
        else:
            out[k] = t
    return out


def layout_of(cols: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[dict, int]:
    """64-byte aligned layout of columns {key: (shape, dtype)} in one buffer, and its size."""
    layout, size = {}, 0
    for k, (shape, dt) in cols.items():
        nbytes = math.prod(shape) * dt.itemsize
        layout[k] = (size, tuple(shape), dt, nbytes)
        size += -(-nbytes // 64) * 64
    return layout, size


def new_buffer(size: int) -> tuple[torch.Tensor, object]:
    """(buffer, how): inside a DataLoader worker, a slot of the worker's ring (`how` = the
    (ring, slot) for `ViaRing`), else a buffer to pickle by value (`how` = "value", wrap it
    in `ByValue`) or one in torch's shared memory; in the main process, plain memory."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(size, dtype=torch.uint8), None
    ring = _Ring.get(size)
    slot = ring.take() if ring is not None else None
    if slot is not None:
        return ring.slot_buffer(slot, size), (ring, slot)
    buf = torch.empty(size, dtype=torch.uint8)
    if size > PIPE_BYTES:
        return buf.share_memory_(), None
    return buf, "value"


_HEADER = 64  # byte 0: the main process has mapped the ring; byte 1 + k: slot k is in use
_FENCE = threading.Lock()
_MAPPED: dict[int, np.ndarray] = {}  # main process: worker pid -> its ring (keeps it mapped)


def _fence() -> None:
    """Orders the slot's reads before the flag's write (a lock's acquire and release)."""
    with _FENCE:
        pass


class _Ring:
    """A DataLoader worker's ring of RING_SLOTS batch slots in one shared-memory segment,
    made on the worker's first batch (bigger slots if a bigger batch comes)."""

    _mine: _Ring | None = None
    _failed = False

    def __init__(self, slot_bytes: int) -> None:
        self.slot_bytes, self.pid, self.next = slot_bytes, os.getpid(), 0
        self.mem = torch.zeros(_HEADER + RING_SLOTS * slot_bytes, dtype=torch.uint8)
        self.mem.share_memory_()  # RuntimeError when /dev/shm is full: no ring then
        self.flags = self.mem[:_HEADER].numpy()

    @classmethod
    def get(cls, size: int) -> _Ring | None:
        ring = cls._mine
        if RING_SLOTS < 1 or size > RING_BYTES or cls._failed or os.name != "posix":
            return None
        if ring is None or ring.pid != os.getpid() or size > ring.slot_bytes:
            try:
                ring = cls._mine = cls(max(-(-size // RING_ROUND) * RING_ROUND, RING_MIN_SLOT))
            except RuntimeError:  # no shared memory: by value from now on
                cls._mine, cls._failed = None, True
                return None
        return ring

    def take(self) -> int | None:
        """A free slot, marked in use until the main process has copied it out."""
        for k in range(RING_SLOTS):
            i = (self.next + k) % RING_SLOTS
            if not self.flags[1 + i]:
                _fence()
                self.flags[1 + i], self.next = 1, i + 1
                return i
        return None

    def offset(self, slot: int) -> int:
        return _HEADER + slot * self.slot_bytes

    def slot_buffer(self, slot: int, size: int) -> torch.Tensor:
        return self.mem[self.offset(slot) : self.offset(slot) + size]


class ViaRing(dict):
    """A dict of tensors over a ring slot that pickles as (slot, layout), plus the ring
    itself until the main process has mapped it; unpickled, a plain dict of writable
    tensors over one fresh buffer (the slot is then free)."""

    def __init__(self, out: dict, how: tuple[_Ring, int], size: int, layout: dict) -> None:
        super().__init__(out)
        self._ring, self._slot = how
        self._size, self._layout = size, layout

    def __reduce__(self):
        r = self._ring
        mem = None if r.flags[0] else r.mem  # pickled by torch: the main process maps it
        return _from_ring, (mem, r.pid, self._slot, r.offset(self._slot), self._size, self._layout)


def _from_ring(mem, pid: int, slot: int, off: int, size: int, layout: dict):
    if mem is not None:  # a worker's (new) ring: keep it, forget the rings of dead workers
        from kdcache.cache.lock import pid_alive

        for p in [p for p in _MAPPED if p != pid and not pid_alive(p)]:
            _MAPPED.pop(p, None)
        _MAPPED[pid] = mem.numpy()  # the array holds the tensor, so the mapping stays
        _MAPPED[pid][0] = 1
    ring = _MAPPED[pid]
    buf = ring[off : off + size].copy()  # numpy: one memcpy, no thread team to wake
    _fence()
    ring[1 + slot] = 0
    return views(torch.from_numpy(buf), layout)


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
        return pack_batch(items.batch)
    return packed_collate(items)


default_collate_fn_map[CachedItem] = collate_items


class Items(Sequence):
    """`__getitems__`'s items as a sequence over the batch they were cut from: `collate`
    packs that batch as it is; the per-item dicts (what default_collate and users index)
    are made on first access only. `input` is a list when the views differ in size, a
    dict of padded (B, L) tensors for text (`lengths`: each item's own length)."""

    def __init__(self, batch: dict, lengths: list[int] | None = None) -> None:
        self.batch, self.lengths = batch, lengths  # lengths: text, inputs padded to the longest
        self._items: list[dict | None] = [None] * len(batch["row"])

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        it = self._items[i]
        if it is None:  # made on first access (default_collate looks at item 0 only)
            if self.lengths is None:
                it = CachedItem((k, v[i]) for k, v in self.batch.items())
            else:  # a text item: a plain dict, its inputs cut back to its own length
                n = self.lengths[i]
                it = {k: {kk: vv[i, :n] for kk, vv in v.items()} if isinstance(v, dict) else v[i]
                      for k, v in self.batch.items()}  # fmt: skip
            it["row"] = int(it["row"])  # a plain int, as __getitem__ gives
            self._items[i] = it
        return it

    def __repr__(self) -> str:
        return repr(list(self))


def packed_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """default_collate for dicts of tensors/numbers, the stacked tensors laid out in ONE
    uint8 buffer (64-byte aligned views; in shared memory inside a DataLoader worker)."""
    return _pack({k: [torch.as_tensor(it[k]) for it in items] for k in items[0]})


def _pack(cols: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each column stacked into a view of one buffer, which a DataLoader worker hands over
    in one piece (`new_buffer`)."""
    cols_layout = {k: ((len(v), *v[0].shape), v[0].dtype) for k, v in cols.items()}
    layout, size = layout_of(cols_layout)
    buf, how = new_buffer(size)
    out = views(buf, layout)
    for k, t in out.items():
        torch.stack(cols[k], out=t)
    return _wrap(out, buf, how, size, layout)


_LAYOUTS: dict[tuple, tuple[dict, int]] = {}


def pack_batch(batch: dict) -> dict:
    """A batch of tensors (and dicts of tensors: text inputs) copied into one buffer, which
    a DataLoader worker hands over in one piece; layouts cached by shapes and dtypes."""
    flat = {}
    for k, v in batch.items():
        flat.update({(k, kk): vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    sig = tuple((k, v.shape, v.dtype) for k, v in flat.items())
    hit = _LAYOUTS.get(sig)
    if hit is None:
        if len(_LAYOUTS) > 64:  # batch sizes and shapes are few; never grow without bound
            _LAYOUTS.clear()
        hit = _LAYOUTS[sig] = layout_of({k: (tuple(shape), dt) for k, shape, dt in sig})
    layout, size = hit
    buf, how = new_buffer(size)
    out = views(buf, layout)
    for k in layout:
        (out[k[0]][k[1]] if isinstance(k, tuple) else out[k]).copy_(flat[k])
    return _wrap(out, buf, how, size, layout)


def _wrap(out: dict, buf: torch.Tensor, how, size: int, layout: dict) -> dict:
    if how == "value":
        return ByValue(out, buf, layout)
    return ViaRing(out, how, size, layout) if how is not None else out
