"""Inspect caches without torch: `info` (a dict), `format_info` (human readable) and `ls`
(every cache under a directory or URL prefix)."""

from __future__ import annotations

import logging
import os
from typing import Any

from kdcache.cache import remote
from kdcache.cache.errors import KdcacheError
from kdcache.cache.reader import MULTI, Cache
from kdcache.cache.sparse import describe
from kdcache.cache.store import open_cache, read_meta

log = logging.getLogger(__name__)


def weights_origin(cache: Cache) -> str:
    """Where the teacher's weights came from: random-init seed (in the spec, keyed), else the
    file name / pretrained tag recorded at precompute, else the weights' sha256."""
    t = cache.spec.teacher
    if t.get("init_seed") is not None:
        return f"random-init seed {t['init_seed']}"
    o = (cache.attrs.get("provenance") or {}).get("weights_origin")
    o = o if isinstance(o, dict) else {}
    sha = str(t.get("weights_sha256") or o.get("sha256") or "")[:12]
    if o.get("kind") == "file":
        return f"file {o.get('name')} sha256 {sha}"
    if o.get("kind") == "pretrained":
        return f"pretrained {o.get('tag')}" + (f" sha256 {sha}" if sha else "")
    return f"sha256 {sha}" if sha else "unknown"


def _cache_info(cache: Cache) -> dict[str, Any]:
    done = cache.done()
    entry = cache.entry_bytes()
    return {
        "path": cache.path,
        "backend": cache.backend_name,
        "key": cache.key,
        "weights": weights_origin(cache),
        "spec": cache.spec.to_dict(),
        "n": cache.n,
        "num_augs": cache.num_augs,
        "num_classes": cache.num_classes,
        "param_dim": cache.spec.param_dim,
        "dtype": cache.dtype,
        "storage": describe(cache.spec.storage),
        "chunk_samples": cache.chunk_samples,
        "compression": cache.spec.compression,
        "n_chunks": cache.n_chunks,
        "done_chunks": int(done.sum()),
        "complete": cache.is_complete(),
        "size_bytes": cache._b.size_bytes(),
        "logits_bytes": cache.nbytes(),
        "entry_bytes": entry,
        "entry_fraction_of_dense_fp16": entry / (2 * cache.num_classes),
        "sparse_kl": cache.attrs.get("sparse_kl"),
        "converted_from": cache.attrs.get("converted_from"),
        "provenance": cache.attrs.get("provenance", {}),
        "finalized_at": cache.attrs.get("finalized_at"),
    }


def info(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """What a cache holds: spec, key, sizes, dtype/storage, bytes, progress, provenance; for a
    multi-teacher store, the same for every member. Read-only."""
    meta = read_meta(path, storage_options)
    if meta.get("kind") == MULTI:
        members = []
        for m in meta.get("members") or []:
            with open_cache(remote.join(path, m), storage_options=storage_options) as c:
                members.append({"member": m, **_cache_info(c)})
        return {"path": path, "kind": MULTI, "complete": bool(meta.get("complete")),
                "members": members}  # fmt: skip
    if meta.get("kind") == "tokens":
        from kdcache.cache.tokentools import token_info

        with open_cache(path, storage_options=storage_options) as cache:
            return token_info(cache)
    with open_cache(path, storage_options=storage_options) as cache:
        return {"kind": "cache", **_cache_info(cache)}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _strong_row(st: dict | None) -> list[tuple[str, str]]:
    """The strong-augmentation stages of a view policy (data/strong.py), one line."""
    if not st:
        return []
    parts = [f"aa {st['aa']}"] if st.get("aa") else []
    if st.get("color_jitter"):
        parts.append(f"color jitter {st['color_jitter']}")
    if st.get("reprob"):
        parts.append(f"random erasing p={st['reprob']} {st['remode']} x{st['recount']}")
    if st.get("mixup") or st.get("cutmix"):
        sw = f", switch {st['switch_prob']}" if "switch_prob" in st else ""
        where = (f"pair mode in groups of {st['mix_group']} rows" if st.get("mixup_mode") ==
                 "pair" else f"elem mode, partner rows of {st['num_rows']}")  # fmt: skip
        parts.append(f"mixup {st['mixup']} / cutmix {st['cutmix']} (p={st['mixup_prob']}{sw}, "
                     f"{where})")  # fmt: skip
    return [("augment", "; ".join(parts) + f"; view {st['size'][0]}x{st['size'][1]}")]


def format_info(d: dict[str, Any]) -> str:
    """Multi-line summary of `info(path)` for humans."""
    if d.get("kind") == "tokens":
        from kdcache.cache.tokentools import format_token_info

        return format_token_info(d)
    if d.get("kind") == MULTI:
        head = f"multi-teacher store {d['path']}: {len(d['members'])} teachers, " + (
            "complete" if d["complete"] else "INCOMPLETE"
        )
        return "\n\n".join([head] + [f"[{m['member']}]\n" + format_info(m) for m in d["members"]])
    spec = d["spec"]
    t, ds, v = spec["teacher"], spec["dataset"], spec["views"]
    prov = d.get("provenance") or {}
    rows = [
        ("cache", f"{d['path']} ({d['backend']})"),
        ("key", d["key"]),
        ("teacher", f"{t.get('name', '?')} ({t.get('source', '?')}), {t['num_classes']} classes"),
        ("weights", str(d.get("weights", "?"))),
        ("dataset", f"{ds.get('name', '?')}/{ds.get('split', '?')}, {ds['n']} samples"),
        (
            "views",
            f"{v.get('policy', '?')}, {v['num_augs']} augs, seed {v.get('seed', '?')}, "
            f"identity view {'yes' if v.get('identity_view') else 'no'}",
        ),
        *_strong_row((v.get("params") or {}).get("strong")),
        (
            "storage",
            f"{d['storage']} {d['dtype']}, chunks of {d['chunk_samples']} samples, "
            f"compression {d['compression']}",
        ),
        (
            "logits",
            f"{d['n']} x {d['num_augs']} x {d['num_classes']} = {human_bytes(d['logits_bytes'])}"
            f" in RAM; {human_bytes(d['size_bytes'])} on disk",
        ),
        (
            "per entry",
            f"{d['entry_bytes']} B ({100 * d['entry_fraction_of_dense_fp16']:.1f}% of dense "
            "float16)",
        ),
        (
            "chunks",
            f"{d['done_chunks']}/{d['n_chunks']} done, "
            + ("complete" if d["complete"] else "INCOMPLETE"),
        ),
        ("created", f"{prov.get('created_at', '?')} by kdcache {prov.get('kdcache', '?')}"),
    ]
    kl = d.get("sparse_kl")
    if kl:
        rows.insert(
            9,
            ("sparse KL", f"mean KL(dense||sparse) {kl.get('T1', 0):.4g} at T=1, "
             f"{kl.get('T4', 0):.4g} at T=4 over {kl.get('entries')} entries"),
        )  # fmt: skip
    if prov.get("command"):
        rows.append(("command", str(prov["command"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


# -- ls ----------------------------------------------------------------------------------------
def _found(url: str, storage_options: dict | None, max_depth: int) -> list[str]:
    """Paths/URLs of every zarr group directory and HDF5 file under `url`."""
    if remote.split_hdf5(url)[0] and not remote.split_hdf5(url)[1]:
        return [url]
    fs, root = remote.filesystem(url, storage_options)
    is_url = remote.is_remote(url)

    def name_of(p: str) -> str:
        return fs.unstrip_protocol(p) if is_url and "://" not in p else p

    out: list[str] = []

    def walk(p: str, depth: int) -> None:
        with remote.errors(url):
            entries = fs.ls(p, detail=True)
        base = {os.path.basename(e["name"].rstrip("/")): e for e in entries}
        if "zarr.json" in base:
            out.append(name_of(p.rstrip("/")))
            return
        for e in sorted(entries, key=lambda e: e["name"]):
            name = e["name"].rstrip("/")
            if os.path.basename(name).startswith("."):
                continue
            if e["type"] == "file" and name.lower().endswith((".h5", ".hdf5")):
                out.append(name_of(name))
            elif e["type"] == "directory" and depth < max_depth and name != p.rstrip("/"):
                walk(name, depth + 1)

    with remote.errors(url):
        fs.invalidate_cache()
    walk(root, 0)
    return out


def _row(c: Cache, kind: str) -> dict[str, Any]:
    s = c.spec
    return {
        "path": c.path, "kind": kind, "key": c.key, "teacher": s.teacher.get("name"),
        "weights": weights_origin(c),
        "dataset": f"{s.dataset.get('name', '?')}/{s.dataset.get('split', '?')}",
        "views": {"policy": s.views.get("policy"), "num_augs": s.num_augs,
                  "seed": s.views.get("seed")},
        "shape": [c.n, c.num_augs, c.num_classes], "dtype": c.dtype,
        "storage": describe(s.storage), "bytes": c._b.size_bytes(),
        "complete": c.is_complete(), "done_chunks": int(c.done().sum()), "n_chunks": c.n_chunks,
    }  # fmt: skip


def ls(url: str, storage_options: dict | None = None, max_depth: int = 6) -> list[dict]:
    """Every cache under a directory or URL prefix (multi-teacher stores: one row per
    member). Read-only; things that are not kdcache caches are skipped."""
    rows: list[dict] = []
    for path in _found(url, storage_options, max_depth):
        try:
            meta = read_meta(path, storage_options)
            if meta.get("kind") == MULTI:
                for m in meta.get("members") or []:
                    with open_cache(remote.join(path, m), storage_options=storage_options) as c:
                        rows.append({**_row(c, f"member of {path}"), "store": path})
                continue
            with open_cache(path, storage_options=storage_options) as c:
                if meta.get("kind") == "tokens":
                    from kdcache.cache.tokentools import token_ls_row

                    rows.append(token_ls_row(c))
                else:
                    rows.append(_row(c, "cache"))
        except KdcacheError as e:
            log.info("ls: skipping %s (%s)", path, e)
    return rows


def format_ls(rows: list[dict]) -> str:
    """A table of `ls` rows."""
    if not rows:
        return "no caches found"
    head = ("key", "teacher", "weights", "dataset", "views", "N x A x C", "storage", "bytes",
            "state", "path")  # fmt: skip
    table = [head]
    for r in rows:
        v = r["views"]
        state = "complete" if r["complete"] else f"{r['done_chunks']}/{r['n_chunks']} chunks"
        table.append((
            r["key"][:12], str(r["teacher"]), str(r.get("weights", "?")), r["dataset"],
            f"{v['policy']} A={v['num_augs']} seed={v['seed']}",
            " x ".join(map(str, r["shape"])), f"{r['dtype']} {r['storage']}",
            human_bytes(r["bytes"]), state, r["path"],
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in table)
    return "\n".join(line.rstrip() for line in lines)
