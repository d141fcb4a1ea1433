"""A whole cache in RAM, in its stored form (what training reads when the cache fits)."""

from __future__ import annotations

from typing import Any

import numpy as np
from kdcache.cache.dtypes import decode
from kdcache.cache.errors import KdcacheError
from kdcache.cache.sparse import Codec


class InMemoryLogits:
    """All stored targets in RAM; rows are decoded to float32 (B, C) only when read."""

    in_memory = True

    def __init__(
        self, raw: Any, dtype: str, chunk_samples: int | None = None, codec: Codec | None = None
    ) -> None:
        self.arrays: dict[str, np.ndarray] = raw if isinstance(raw, dict) else {"logits": raw}
        self.dtype, self.codec = dtype, codec
        if codec is None or codec.kind == "dense":
            logits = self.arrays["logits"]
            if logits.ndim != 3:
                raise KdcacheError(
                    f"in-memory logits have shape {logits.shape}; expected (N, A, C)"
                )
            self.num_classes = logits.shape[2]
        else:
            self.num_classes = codec.c
        self.n, self.num_augs = next(iter(self.arrays.values())).shape[:2]
        self.chunk_samples = chunk_samples or self.n

    @property
    def raw(self) -> np.ndarray:
        """Dense logits in the stored dtype."""
        if "logits" not in self.arrays:
            raise KdcacheError("a sparse cache has no raw logits; use read() or full()")
        return self.arrays["logits"]

    @property
    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.arrays.values()))

    def decode_rows(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        if self.codec is None:
            return decode(rows["logits"], self.dtype)
        return self.codec.decode(rows)

    def read(self, samples: Any, augs: Any) -> np.ndarray:
        """logits[samples[j], augs[j]] as (B, C) float32."""
        s = np.asarray(samples, dtype=np.int64).reshape(-1)
        a = np.broadcast_to(np.asarray(augs, dtype=np.int64), s.shape)
        if s.size and (s.min() < 0 or s.max() >= self.n or a.min() < 0 or a.max() >= self.num_augs):
            raise KdcacheError(
                f"(sample, aug) out of range: samples 0..{self.n - 1}, augs 0..{self.num_augs - 1}"
            )
        return self.decode_rows({k: v[s, a] for k, v in self.arrays.items()})

    def full(self) -> np.ndarray:
        """Every logit as float32 (N, A, C), decoded in slices to bound temporary memory."""
        out = np.empty((self.n, self.num_augs, self.num_classes), dtype=np.float32)
        step = max(1, (1 << 24) // max(1, self.num_augs * self.num_classes))
        for i in range(0, self.n, step):
            out[i : i + step] = self.decode_rows(
                {k: v[i : i + step] for k, v in self.arrays.items()}
            )
        return out
