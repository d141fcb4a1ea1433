"""Inspect a cache without torch: `info` (a dict) and `format_info` (human readable)."""

from __future__ import annotations

from typing import Any

from cache.store import open_cache


def info(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """What a cache holds: spec, key, sizes, dtype, bytes on disk, progress, provenance."""
    with open_cache(path, storage_options=storage_options) as cache:
        done = cache.done()
        return {
            "path": cache.path,
            "backend": cache.backend_name,
            "key": cache.key,
            "spec": cache.spec.to_dict(),
            "n": cache.n,
            "num_augs": cache.num_augs,
            "num_classes": cache.num_classes,
            "param_dim": cache.spec.param_dim,
            "dtype": cache.dtype,
            "chunk_samples": cache.chunk_samples,
            "compression": cache.spec.compression,
            "n_chunks": cache.n_chunks,
            "done_chunks": int(done.sum()),
            "complete": cache.is_complete(),
            "size_bytes": cache._b.size_bytes(),
            "logits_bytes": cache.nbytes(),
            "provenance": cache.attrs.get("provenance", {}),
            "finalized_at": cache.attrs.get("finalized_at"),
        }


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_info(d: dict[str, Any]) -> str:
    """Multi-line summary of `info(path)` for humans."""
    spec = d["spec"]
    t, ds, v = spec["teacher"], spec["dataset"], spec["views"]
    prov = d.get("provenance") or {}
    rows = [
        ("cache", f"{d['path']} ({d['backend']})"),
        ("key", d["key"]),
        ("teacher", f"{t.get('name', '?')} ({t.get('source', '?')}), {t['num_classes']} classes"),
        ("dataset", f"{ds.get('name', '?')}/{ds.get('split', '?')}, {ds['n']} samples"),
        (
            "views",
            f"{v.get('policy', '?')}, {v['num_augs']} augs, seed {v.get('seed', '?')}, "
            f"identity view {'yes' if v.get('identity_view') else 'no'}",
        ),
        (
            "storage",
            f"{d['dtype']}, chunks of {d['chunk_samples']} samples, compression {d['compression']}",
        ),
        (
            "logits",
            f"{d['n']} x {d['num_augs']} x {d['num_classes']} = {human_bytes(d['logits_bytes'])}"
            f" in RAM; {human_bytes(d['size_bytes'])} on disk",
        ),
        (
            "chunks",
            f"{d['done_chunks']}/{d['n_chunks']} done, "
            + ("complete" if d["complete"] else "INCOMPLETE"),
        ),
        ("created", f"{prov.get('created_at', '?')} by kdcache {prov.get('kdcache', '?')}"),
    ]
    if prov.get("command"):
        rows.append(("command", str(prov["command"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)
