"""`cache verify [--replay]`: storage checks plus proof that stored view params replay."""

from __future__ import annotations

import logging

import numpy as np
from kdcache.cache.errors import AttrsError, KdcacheError

log = logging.getLogger(__name__)


def replay_problems(cache, data_root: str | None) -> list[str]:
    """Recompute the stored view digests from the dataset and the stored params."""
    from kdcache.data.datasets import load_dataset
    from kdcache.data.loader import ViewMaker, batched_views, cache_rows, use_batched
    from kdcache.data.text import TextCollate
    from kdcache.data.views import get_policy, view_digest
    from kdcache.precompute.setup import _as_tensor

    spec = cache.spec
    digests = (cache.attrs.get("provenance") or {}).get("replay_digests") or []
    if not digests:
        return ["cache stores no replay digests"]
    name, prov = spec.dataset["name"], cache.attrs.get("provenance") or {}
    if name in ("hfds", "wds"):  # located by --data-root, else where stage 1 read it
        where = data_root or str(prov.get("dataset", "")).partition(":")[2]
        name, data_root = f"{name}:{where}", None
    else:  # imagefolder, text, cifar: --data-root, else the root stage 1 read (provenance)
        data_root = data_root or prov.get("data_root")
    ds = load_dataset(name, root=data_root, split=spec.dataset["split"], max_samples=spec.n)
    samples, same = cache_rows(spec.dataset, cache.keys, ds)
    if not same:
        return [f"dataset at {data_root!r} does not match the cache's dataset fingerprint"]
    collate = None
    if ds.modality == "text":
        from kdcache.models.factory import load_tokenizer

        files = cache.tokenizer_files()
        tok = load_tokenizer({"modality": "text", **spec.teacher, "tokenizer_files": files})
        collate = TextCollate(tok, spec.teacher["preprocessing"]["max_length"])
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
