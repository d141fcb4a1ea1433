"""`cache verify [--replay]`: storage checks plus proof that stored view params replay."""

from __future__ import annotations

import logging

import numpy as np

from cache.errors import KdcacheError

log = logging.getLogger(__name__)


def replay_problems(cache, data_root: str | None) -> list[str]:
    """Recompute the stored view digests from the dataset and the stored params."""
    import torch

    from data.datasets import load_dataset, raw_batch
    from data.views import get_policy, tokenize_texts, view_digest

    spec = cache.spec
    digests = (cache.attrs.get("provenance") or {}).get("replay_digests") or []
    if not digests:
        return ["cache stores no replay digests"]
    ds = load_dataset(
        spec.dataset["name"], root=data_root, split=spec.dataset["split"], max_samples=spec.n
    )
    if ds.fingerprint() != spec.dataset["fingerprint"]:
        return [f"dataset at {data_root!r} does not match the cache's dataset fingerprint"]
    if ds.modality == "text":
        from models.factory import load_tokenizer

        files = cache.tokenizer_files()
        tok = load_tokenizer({"modality": "text", **spec.teacher, "tokenizer_files": files})
        ds.tokens = tokenize_texts(tok, ds.texts, spec.teacher["preprocessing"]["max_length"])
    policy = get_policy(spec.views["policy"], **(spec.views.get("params") or {}))
    problems = []
    for d in digests:
        i, a = d["sample"], d["aug"]
        params = torch.from_numpy(cache.view_params(np.array([i]))[:, a])
        view = policy.apply(raw_batch(ds, np.array([i])), params)
        view = view["input_ids"] if isinstance(view, dict) else view
        if view_digest(view) != d["sha256"]:
            problems.append(f"replayed view of sample {i} aug {a} differs from the teacher's")
    return problems


def run_verify(
    path: str,
    replay: bool = False,
    data_root: str | None = None,
    storage_options: dict | None = None,
) -> list[str]:
    """All problems found in a cache (empty list: it is sound)."""
    from cache.store import open_cache
    from cache.verify import verify

    problems = verify(path, storage_options=storage_options or None)
    if replay:
        cache = open_cache(path, storage_options=storage_options or None)
        try:
            problems += replay_problems(cache, data_root)
        except KdcacheError as e:
            problems.append(str(e))
        finally:
            cache.close()
    return problems
