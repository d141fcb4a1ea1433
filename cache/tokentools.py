"""Cache tools on token caches: info (bytes per token vs dense fp16 and Megatron), ls rows."""

from __future__ import annotations

import math
from typing import Any

from kdcache.cache.tokens import TokenCache
from kdcache.cache.tokenstore import bytes_per_token


def megatron_bytes_per_token(k: int) -> float:
    """Megatron-LM's offline-logits format: K fp16 log-probs + K 17-bit ids."""
    return 2 * k + 17 * k / 8


def token_info(c: TokenCache) -> dict[str, Any]:
    spec = c.spec
    size = c.size_bytes()
    bpt = bytes_per_token(spec)
    v = c.vocab_size
    prov = c.attrs.get("provenance") or {}
    return {
        "kind": "tokens", "path": c.path, "backend": c.backend_name, "key": c.key,
        "spec": spec, "n": c.n, "n_tokens": c.n_tokens, "mode": c.mode, "k": c.k,
        "top_p": c.top_p, "vocab_size": v, "max_length": c.max_length, "dtype": c.dtype,
        "chunk_samples": c.chunk_samples, "n_chunks": c.n_chunks,
        "done_chunks": int(c.done().sum()), "complete": c.is_complete(),
        "compression": spec["storage"]["compression"], "size_bytes": size,
        "bytes_per_token": bpt,
        "bytes_per_token_on_disk": None if size is None else round(size / max(c.n_tokens, 1), 2),
        "dense_fp16_bytes_per_token": 2 * v,
        "megatron_bytes_per_token": megatron_bytes_per_token(c.k),
        "kl_sample": c.attrs.get("kl_sample"), "provenance": prov,
        "tokenizer_sha256": (c.attrs.get("tokenizer") or {}).get("sha256"),
    }  # fmt: skip


def format_token_info(d: dict[str, Any]) -> str:
    from kdcache.cache.tools import human_bytes

    spec = d["spec"]
    t, ds = spec["teacher"], spec["dataset"]
    mode = f"top-{d['k']}" + (f", top-p {d['top_p']}" if d["top_p"] else "")
    if d["mode"] == "sampled":
        mode = f"sampled {d['k']} draws, seed {spec['tokens']['seed']}"
    rows = [
        ("cache", f"{d['path']} ({d['backend']}, token cache)"),
        ("key", d["key"]),
        ("teacher", f"{t.get('name')} ({t.get('arch')}), vocab {d['vocab_size']}"),
        ("weights", f"sha256 {str(t.get('weights_sha256'))[:16]}"),
        ("dataset", f"{ds.get('name')}/{ds.get('split')}, {ds.get('rows')} rows -> {d['n']} "
                    f"samples, {d['n_tokens']} tokens, max length {d['max_length']}"),
        ("targets", f"{mode}, {d['dtype']}"),
        ("per token", f"{d['bytes_per_token']} B stored ({d['bytes_per_token_on_disk']} B on "
                      f"disk); dense fp16 {d['dense_fp16_bytes_per_token']} B; Megatron "
                      f"{d['megatron_bytes_per_token']:g} B"),
        ("size", human_bytes(d["size_bytes"])),
        ("chunks", f"{d['done_chunks']}/{d['n_chunks']} done, "
                   + ("complete" if d["complete"] else "INCOMPLETE")),
    ]  # fmt: skip
    kl = d.get("kl_sample")
    if kl:
        val = kl.get("mean_kl")
        shown = f"{val:.4g}" if isinstance(val, float) and math.isfinite(val) else str(val)
        rows.append(("KL sample", f"mean {kl.get('direction')} {shown} nats over "
                                  f"{kl.get('tokens')} tokens"))  # fmt: skip
    prov = d.get("provenance") or {}
    if prov.get("command"):
        rows.append(("command", str(prov["command"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


def token_ls_row(c: TokenCache) -> dict[str, Any]:
    s = c.spec
    return {
        "path": c.path, "kind": "tokens", "key": c.key, "teacher": s["teacher"].get("name"),
        "weights": str(s["teacher"].get("weights_sha256"))[:12],
        "dataset": f"{s['dataset'].get('name')}/{s['dataset'].get('split')}",
        "views": {"policy": "tokens", "num_augs": 1, "seed": s["tokens"].get("seed")},
        "shape": [c.n, c.n_tokens, c.k], "dtype": c.dtype,
        "storage": f"{c.mode}{c.k}", "bytes": c.size_bytes(), "complete": c.is_complete(),
        "done_chunks": int(c.done().sum()), "n_chunks": c.n_chunks,
    }  # fmt: skip
