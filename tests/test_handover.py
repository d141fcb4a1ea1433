"""How a DataLoader worker hands `CachedDataset` batches to the main process
(data/handover.py): through its shared-memory ring, slots reused only once copied out; by
value when the ring is full or cannot be made. Every batch is checked against the batch made
in the main process, with all batches held until the end."""

from __future__ import annotations

import kdcache
import pytest
import torch
from kdcache.data import handover

N = 32


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("handover")
    return kdcache.precompute(
        teacher="resnet8", random_init=0, dataset="digits", max_samples=N, num_augs=3,
        out=str(d / "c.zarr"), device="cpu",
    )  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_rings(monkeypatch):
    monkeypatch.setattr(handover, "_MAPPED", {})


def _epochs(ds, batches, epochs=2, persistent=True, collate_fn=None, prefetch=2, ctx=None):
    """All batches of `epochs` epochs from one worker (held), with what they must equal."""
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=batches, num_workers=1, persistent_workers=persistent,
        prefetch_factor=prefetch, collate_fn=collate_fn or ds.collate,
        multiprocessing_context=ctx,
    )  # fmt: skip
    got, want = [], []
    for e in range(epochs):
        ds.set_epoch(e)
        got += list(loader)
        want += [ds.collate(ds.__getitems__(b)) for b in batches]
    return got, want


def _same(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


def test_ring_slots_are_reused_only_after_the_copy(cache_path, monkeypatch):
    monkeypatch.setattr(handover, "RING_SLOTS", 2)  # 16 batches through 2 slots
    ds = kdcache.CachedDataset(cache_path, seed=3)
    batches = [list(range(i, N, 8)) for i in range(8)]
    got, want = _epochs(ds, batches, prefetch=2)
    _same(got, want)
    assert len(handover._MAPPED) == 1  # the worker's ring, mapped once
    assert not any(g["input"].untyped_storage().is_shared() for g in got)  # copied out
    got[0]["input"].zero_()  # each batch its own memory
    assert torch.equal(got[1]["input"], want[1]["input"])


def test_a_full_ring_falls_back_and_corrupts_nothing(cache_path, monkeypatch):
    monkeypatch.setattr(handover, "RING_SLOTS", 2)
    ds = kdcache.CachedDataset(cache_path, seed=1)
    batches = [list(range(i * 4, i * 4 + 4)) for i in range(8)]
    unpacked = lambda items: dict(ds.collate(items))  # noqa: E731  # slots are never freed
    got, want = _epochs(ds, batches, collate_fn=unpacked)
    _same(got, want)
    assert not handover._MAPPED  # the ring itself never came back as a ring message


def test_a_bigger_batch_gets_a_new_ring_and_dead_workers_rings_are_dropped(cache_path, monkeypatch):
    monkeypatch.setattr(handover, "RING_MIN_SLOT", 0)
    monkeypatch.setattr(handover, "RING_ROUND", 64)
    ds = kdcache.CachedDataset(cache_path, seed=2)
    batches = [[0, 1], [2, 3, 4, 5, 6, 7, 8, 9], [10], list(range(11, N))]
    got, want = _epochs(ds, batches, epochs=2, persistent=False)  # new worker each epoch
    _same(got, want)
    (mem,) = handover._MAPPED.values()  # the first worker's rings are gone
    assert mem.size >= 64 + handover.RING_SLOTS * (N - 11) * 3 * 8 * 8


def test_no_shared_memory_for_a_ring_hands_over_by_value(cache_path, monkeypatch):
    def no_shm(self, slot_bytes):
        raise RuntimeError("unable to allocate shared memory(shm): No space left on device")

    monkeypatch.setattr(handover._Ring, "__init__", no_shm)
    ds = kdcache.CachedDataset(cache_path)
    got, want = _epochs(ds, [list(range(i, i + 8)) for i in range(0, N, 8)])
    _same(got, want)
    assert not handover._MAPPED


def test_spawned_workers_use_the_ring_too(cache_path):
    """spawn (macOS's default; forkserver is Linux's from Python 3.14) pickles the dataset
    into a fresh interpreter: the ring is made and mapped the same way."""
    ds = kdcache.CachedDataset(cache_path, seed=4)
    got, want = _epochs(ds, [list(range(i, i + 8)) for i in range(0, N, 8)], ctx="spawn")
    _same(got, want)
    assert len(handover._MAPPED) == 1
