"""`kdcache.ChunkSampler`: chunk-aware, rank-sharded order over a `CachedDataset` whose
teacher logits are read chunk by chunk (a cache bigger than RAM)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data.cached import CachedDataset


class ChunkSampler(torch.utils.data.Sampler):
    """Chunk-aware, rank-sharded order for a `CachedDataset` whose cache is bigger than RAM:
    each epoch shuffles the chunk order by (seed, epoch), deals chunks to ranks in turn, and
    shuffles items within buffers of `buffer_chunks` chunks, so reads stay sequential per
    chunk; in a pair-mode Mixup cache the two items of a pair sit side by side. Every rank
    yields the same count (short ranks repeat their own items, like DistributedSampler;
    `drop_last` trims instead). Call `set_epoch(e)` here and on the dataset each epoch.
    With `lanes=L` and the DataLoader's `batch_size`, each buffer of L x buffer_chunks
    chunks is split into L lanes of chunks and batch j holds rows of lane j % L only: a
    DataLoader hands batch j to worker j % num_workers, so with L = num_workers each worker
    reads only its own chunks (every chunk once per epoch; best when batch_size divides the
    chunk size). The order depends on (seed, epoch, rank, lanes, batch_size), never on how
    many workers actually run."""

    def __init__(
        self,
        dataset: CachedDataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 4,
        drop_last: bool = False,
        lanes: int = 1,
        batch_size: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (
                dist.get_world_size() if on else 1)  # fmt: skip
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
        if not 0 <= rank < num_replicas:
            raise KdcacheError(f"rank {rank} out of range 0..{num_replicas - 1}")
        if buffer_chunks < 1:
            raise KdcacheError(f"buffer_chunks={buffer_chunks}: expected >= 1")

        def whole(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

        if not whole(lanes) or (lanes > 1 and not whole(batch_size)):
            raise KdcacheError(
                f"lanes={lanes}, batch_size={batch_size}: expected lanes >= 1, and with "
                "lanes > 1 the DataLoader's batch_size (>= 1)"
            )
        self.lanes, self.batch_size = int(lanes), batch_size
        self.dataset, self.world, self.rank = dataset, int(num_replicas), int(rank)
        self.shuffle, self.seed, self.buffer = shuffle, int(seed), int(buffer_chunks)
        self.drop_last, self.epoch = drop_last, 0
        spec = dataset.cache.spec
        self.chunk_samples, self.n_chunks = spec.chunk_samples, spec.n_chunks
        self.per_row = dataset.cache.num_views if dataset.k == 0 else 1
        total = len(dataset)
        self.num = total // self.world if drop_last else math.ceil(total / self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num

    def __iter__(self) -> Iterator[int]:
        rng = np.random.Generator(np.random.Philox(key=(self.seed << 32) + self.epoch + 7))
        chunks = rng.permutation(self.n_chunks) if self.shuffle else np.arange(self.n_chunks)
        mine = chunks[self.rank :: self.world]
        out, step = [], self.buffer * self.lanes
        for lo in range(0, len(mine), step):
            group = mine[lo : lo + step]
            out.append(self._interleave([self._items(group[w :: self.lanes], rng)
                                         for w in range(self.lanes)]))  # fmt: skip
        items = np.concatenate(out) if out else np.empty(0, np.int64)
        if len(items) < self.num and len(items):  # pad with this rank's own items
            items = np.resize(items, self.num)
        return iter(items[: self.num].tolist())

    def _items(self, chunks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The items of these chunks, shuffled (pairs of a pair-mode cache side by side)."""
        n = len(self.dataset.cache)
        if not len(chunks):
            return np.empty(0, np.int64)
        idx = np.concatenate([
            np.arange(c * self.chunk_samples, min((c + 1) * self.chunk_samples, n))
            for c in chunks
        ])  # fmt: skip
        idx = (idx[:, None] * self.per_row + np.arange(self.per_row)).reshape(-1)
        return self.dataset.pair_adjacent(rng.permutation(idx) if self.shuffle else idx)

    def _interleave(self, lanes: list[np.ndarray]) -> np.ndarray:
        """Batches taken from the lanes in turn: batch j of the buffer holds lane j % L."""
        if len(lanes) == 1:
            return lanes[0]
        bs = self.batch_size
        cut = [[lane[i : i + bs] for i in range(0, len(lane), bs)] for lane in lanes]
        turns = [b for group in itertools.zip_longest(*cut) for b in group if b is not None]
        return np.concatenate(turns) if turns else np.empty(0, np.int64)
