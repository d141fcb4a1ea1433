"""kdcache: run the teacher once, keep its logits, train many students fast.

The public API is the names in ``__all__``; everything else (``kdcache.data.views._sample_key``,
...) is internal and may change. Names are resolved lazily so ``import kdcache`` (and the CLI's
``--help``) stays instant: torch is imported only when a name that needs it is first used.

    import kdcache
    c = kdcache.open_cache("caches/digits-train/resnet20-0123456789ab.zarr")
    ds = kdcache.CachedDataset(c, views="one", seed=0)        # a torch Dataset of replayed views
    loss = kdcache.get_loss("wsl", T=4, alpha=2.25)            # the very function `distill` uses
    kdcache.precompute(teacher="resnet20", weights="t.pt", out="caches/")   # == the CLI command
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "open_cache",
    "TeacherCache",
    "TokenCache",
    "CachedDataset",
    "ChunkSampler",
    "get_loss",
    "list_losses",
    "precompute",
    "distill",
    "KdcacheError",
    "__version__",
]

# name -> module that defines it (imported on first use)
_LAZY = {
    "open_cache": "kdcache.cache.public",
    "TeacherCache": "kdcache.cache.public",
    "TokenCache": "kdcache.cache.tokens",
    "CachedDataset": "kdcache.data.cached",
    "ChunkSampler": "kdcache.data.chunks",
    "get_loss": "kdcache.distill.api",
    "list_losses": "kdcache.distill.api",
    "KdcacheError": "kdcache.cache.errors",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:  # a clone run as `python cli.py` without an install
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    if name in ("precompute", "distill"):  # the stage subpackages are callable (see README)
        return import_module(f"kdcache.{name}")
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above are lazy
    from kdcache.cache.errors import KdcacheError
    from kdcache.cache.public import TeacherCache, open_cache
    from kdcache.data.cached import CachedDataset
    from kdcache.data.chunks import ChunkSampler
    from kdcache.distill.api import get_loss, list_losses
