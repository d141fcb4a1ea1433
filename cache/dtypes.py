"""Stored value dtypes in pure numpy (bfloat16 is kept as the high 16 bits of float32).

Its own module so the dense and sparse codecs and both backends share one definition.
"""

from __future__ import annotations

import numpy as np

STORED_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float array -> stored dtype; bfloat16 rounds to nearest even."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):  # overflow to inf is reported by the caller
        return np.ascontiguousarray(values, dtype=STORED_DTYPES[dtype])


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """stored dtype -> float32."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw.astype(np.float32)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (vectorized, wraps mod 2**64): counter-based seeded hashing."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))
