"""Combining the logits of several teachers (members of a multi-teacher store, or several
caches): one numpy function shared by `open_cache` readers and distill's teacher source."""

from __future__ import annotations

import numpy as np
from kdcache.cache.errors import KdcacheError

ENSEMBLES = ("mean-logits", "mean-probs")


def combine(logits: list[np.ndarray], mode: str) -> np.ndarray:
    """Teacher ensemble: mean of logits, or log of the mean of probabilities."""
    if mode not in ENSEMBLES:
        raise KdcacheError(f"unknown --ensemble {mode!r}; expected mean-logits or mean-probs")
    if len(logits) == 1:
        return logits[0]
    stack = np.stack([x.astype(np.float32, copy=False) for x in logits])
    if mode == "mean-logits":
        return stack.mean(0)
    m = stack.max(-1, keepdims=True)
    p = np.exp(stack - m)
    p /= p.sum(-1, keepdims=True)
    return np.log(p.mean(0) + 1e-12).astype(np.float32)
