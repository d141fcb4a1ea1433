"""`kdcache list losses|models|datasets|views`: every row comes from a registry, so a newly
registered loss, source or policy is listed (and documented) without touching the CLI."""

from __future__ import annotations

import inspect
from typing import Any

KINDS = ("losses", "models", "datasets", "views")


def entries(kind: str, pattern: str | None = None) -> list[dict[str, Any]]:
    """Rows of one registry; ``pattern`` (fnmatch, e.g. ``resnet*``) filters model names."""
    if kind == "losses":
        return _losses()
    if kind == "models":
        return _models(pattern)
    if kind == "datasets":
        return _datasets()
    if kind == "views":
        return _views()
    raise ValueError(f"unknown list {kind!r}: expected one of {', '.join(KINDS)}")


def _losses() -> list[dict[str, Any]]:
    from kdcache.distill.losses import LOSSES, loss_hparams

    return [
        {
            "name": name,
            "teacher": "cache" if d.needs_cache else ("history" if d.needs_teacher else "none"),
            "help": d.help,
            "hparams": loss_hparams(name),
        }
        for name, d in LOSSES.items()
    ]


def _models(pattern: str | None) -> list[dict[str, Any]]:
    import fnmatch

    from kdcache.models.cifar_zoo import CIFAR_MODELS
    from kdcache.models.factory import MODEL_SOURCES

    rows: list[dict[str, Any]] = [
        {"source": key, "help": src.help, "names": []} for key, src in MODEL_SOURCES.items()
    ]
    by = {r["source"]: r for r in rows}
    by["cifar"]["names"] = [m for m in CIFAR_MODELS if not pattern or fnmatch.fnmatch(m, pattern)]
    if pattern:  # timm and torchvision have hundreds of names: listed only on request
        import timm
        import torchvision

        by["timm"]["names"] = timm.list_models(pattern)
        tv = torchvision.models.list_models(module=torchvision.models)
        by["tv:"]["names"] = ["tv:" + m for m in tv if fnmatch.fnmatch(m, pattern)]
    return rows


def _datasets() -> list[dict[str, Any]]:
    from kdcache.data.datasets import SOURCES, _register_streaming

    _register_streaming()
    return [{"name": name, "help": src.help} for name, src in SOURCES.items()]


def _views() -> list[dict[str, Any]]:
    from kdcache.data.views import POLICIES

    rows = []
    for name, cls in POLICIES.items():
        sig = inspect.signature(cls.__init__)
        options = {
            p.name: p.default
            for p in list(sig.parameters.values())[1:]
            if p.default is not inspect.Parameter.empty and p.name != "tokenizer"
        }
        rows.append(
            {
                "name": name,
                "modality": cls.modality,
                "help": cls.help,
                "view_params": list(cls.param_names),
                "options": options,
            }
        )
    from kdcache.data.strongdoc import describe

    return rows + describe()  # strong augmentation stages, composed on any image policy


def format_entries(kind: str, rows: list[dict[str, Any]]) -> str:
    """Human-readable listing (``--json`` prints ``rows`` as they are)."""
    lines: list[str] = []
    if kind == "losses":
        for r in rows:
            lines.append(f"{r['name']:<11} {r['help']} (teacher: {r['teacher']})")
            for h in r["hparams"]:
                lines.append(f"    {h['name']:<11} default {h['default']!r:<8} {h['domain']}")
    elif kind == "models":
        for r in rows:
            lines.append(f"{r['source']:<6} {r['help']}")
            if r["names"]:
                lines.append("       " + " ".join(r["names"]))
        lines.append("(timm and tv: names: kdcache list models --filter 'resnet*')")
    elif kind == "datasets":
        lines += [f"{r['name']:<12} {r['help']}" for r in rows]
    else:
        for r in rows:
            opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items())
            lines.append(f"{r['name']:<11} [{r['modality']}] {r['help']}")
            lines.append(f"    view_params ({', '.join(r['view_params'])}); options: {opts}")
            for op in r.get("ops", []):
                lines.append(f"      {op['id']:>2} {op['name']:<20} {op['arg']}")
    return "\n".join(lines)
