"""`cache verify [--replay]`: storage checks plus proof that stored view params replay."""

from __future__ import annotations

import logging

import numpy as np
from kdcache.cache.errors import AttrsError, KdcacheError

log = logging.getLogger(__name__)


def replay_problems(cache, data_root: str | None) -> list[str]:
    """Recompute the stored view digests from the dataset and the stored params."""
    from kdcache.data.cached import load_cache_source, text_collate
    from kdcache.data.loader import ViewMaker, batched_views, cache_rows, use_batched
    from kdcache.data.views import get_policy, view_digest
    from kdcache.precompute.setup import _as_tensor

    spec = cache.spec
    prov = cache.attrs.get("provenance") or {}
    digests = prov.get("replay_digests") or []
    if not digests:
        return ["cache stores no replay digests"]
    ds = load_cache_source(spec, prov, data_root)
    samples, same = cache_rows(spec.dataset, cache.keys, ds)
    if not same:
        where = data_root or prov.get("data_root")
        return [f"dataset at {where!r} does not match the cache's dataset fingerprint"]
    collate = None
    if ds.modality == "text":
        collate = text_collate(spec, cache.tokenizer_files())[0]
    policy = get_policy(spec.views["policy"], **(spec.views.get("params") or {}))
    maker = ViewMaker(ds, policy, collate, rows=samples)
    problems = []
    for d in digests:
        i, a = d["sample"], d["aug"]
        params = cache.view_params(np.array([i]))[:, a]  # (1, P)
        s = int(samples[i])
        if use_batched(ds, policy):
            view = batched_views(ds, policy, np.array([s]), params)
        else:
            view = maker.collate([(i, *maker.replay(s, params))])["views"]
        if view_digest(_as_tensor(view)) != d["sha256"]:
            problems.append(f"replayed view of sample {i} aug {a} differs from the teacher's")
    return problems


def run_verify(
    path: str,
    replay: bool = False,
    data_root: str | None = None,
    storage_options: dict | None = None,
) -> list[str]:
    """All problems found in a cache (empty list: it is sound)."""
    from kdcache.cache.store import open_cache
    from kdcache.cache.verify import verify

    problems = verify(path, storage_options=storage_options or None)
    if replay:
        try:
            cache = open_cache(path, storage_options=storage_options or None)
        except AttrsError:
            return problems  # verify named the bad attrs; nothing to replay from
        try:
            problems += replay_problems(cache, data_root)
        except KdcacheError as e:
            problems.append(str(e))
        finally:
            cache.close()
    return problems
