"""The one registry idiom of kdcache: a plain dict filled by a ``@register(name, help=...)``
decorator (timm's ``register_model`` style), each entry carrying a one-line ``help`` so help
texts and ``kdcache list`` come from the registries. Pure Python, in the bottom layer, so
``data`` (sources, views) and ``models`` (model sources) share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdcache.cache.errors import KdcacheError


def registry_decorator(registry: dict, kind: str) -> Callable:
    """``register(name, help=...)`` for ``registry``: stores the object and its help line."""

    def register(name: str, help: str) -> Callable:  # noqa: A002 - mirrors click's help=
        def deco(obj):
            if name in registry:
                raise KdcacheError(f"{kind} {name!r} is registered twice")
            if isinstance(obj, type):  # a class carries its own help (one name per class)
                obj.help = help
                registry[name] = obj
            else:  # a function may serve several names: each entry gets its own help
                registry[name] = Entry(obj, help)
            return obj

        return deco

    return register


class Entry:
    """A registered function with its one-line help; calling it calls the function."""

    def __init__(self, fn: Callable, help: str) -> None:  # noqa: A002
        self.fn, self.help = fn, help

    def __call__(self, *args, **kw):
        return self.fn(*args, **kw)


def lookup(registry: dict, name: str, kind: str) -> Any:
    """The entry for ``name``: exact key, or a prefix key ending with ':' (``hfds:PATH``)."""
    if name in registry:
        return registry[name]
    for key, obj in registry.items():
        if key.endswith(":") and name.startswith(key):
            return obj
    raise KdcacheError(f"unknown {kind} {name!r}: expected one of {', '.join(registry)}")
