"""What a dataset source and a view policy are (``typing.Protocol``s), and the one registry
idiom of kdcache: a plain dict filled by a ``@register(...)`` decorator (timm's
``register_model`` style), each entry carrying a one-line ``help`` so help texts and
``kdcache list`` come from the registries.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from kdcache.cache.errors import KdcacheError
from kdcache.cache.registry import Entry, lookup, registry_decorator  # noqa: F401 - the idiom
from kdcache.cache.spec import dataset_fingerprint


@runtime_checkable
class Dataset(Protocol):
    """A dataset source: stable keys + labels up front (the fingerprint), samples on demand.

    ``load(i)`` returns the decoded original sample (an RGB ``PIL.Image`` at native size, or
    a ``str``); nothing is decoded before it is asked for. ``in_ram`` sources (CIFAR, digits)
    also offer ``get(indices)``: a uint8 ``(B,3,H,W)`` batch for the batched view path.
    """

    name: str
    split: str
    keys: list[str]
    labels: np.ndarray
    num_classes: int
    classes: list[str] | None
    modality: str  # "image" | "text"
    in_ram: bool

    def __len__(self) -> int: ...

    def load(self, i: int) -> Any: ...

    def fingerprint(self) -> str: ...

    def spec(self) -> dict: ...


@runtime_checkable
class ViewPolicy(Protocol):
    """A seeded augmentation: uniforms -> params (pure), params + original sample -> view.

    ``param_names`` is the ``view_params`` layout stored in a cache (one float32 each).
    ``needs_size``: params depend on the original size (drawn after decoding, in the worker).
    ``batched``: ``apply(uint8 batch, params)`` exists for same-size in-RAM data / token ids.
    """

    name: str
    help: str
    modality: str  # "image" | "text" | "any"
    param_names: tuple[str, ...]
    num_uniforms: int
    needs_size: bool
    batched: bool
    params: dict

    def from_uniforms(self, u: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray: ...

    def identity_params(self) -> np.ndarray: ...


class SourceBase:
    """Shared bookkeeping of the sources: keys, labels, fingerprint, spec section."""

    name: str
    split: str
    keys: list[str]
    labels: np.ndarray
    num_classes: int
    classes: list[str] | None = None
    modality = "image"
    in_ram = False
    decode_rule: str | None = None  # recorded in the spec when it changes pixels

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.keys, np.asarray(self.labels, dtype=np.int64))

    def spec(self) -> dict:
        """The ``dataset`` section of a cache spec."""
        out = {
            "name": self.name,
            "split": self.split,
            "n": len(self),
            "fingerprint": self.fingerprint(),
        }
        if self.decode_rule:
            out["decode"] = self.decode_rule
        return out

    def head(self, n: int) -> None:
        """Keep the first ``n`` samples (``--max-samples``): nothing else is touched."""
        self.keys = self.keys[:n]
        self.labels = np.asarray(self.labels)[:n]


def missing_split(what: str, split: str, existing: list[str]) -> KdcacheError:
    """Never fall back to the root or to train: name the splits that exist."""
    have = ", ".join(repr(s) for s in existing) if existing else "none"
    return KdcacheError(f"{what} has no split {split!r}; splits that exist: {have}")


def decode_image(data_or_path, where: str):
    """RGB ``PIL.Image`` from a path or bytes; one clear error naming the bad file."""
    import io

    from PIL import Image

    try:
        src = (
            io.BytesIO(data_or_path)
            if isinstance(data_or_path, (bytes, bytearray))
            else data_or_path
        )
        with Image.open(src) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise KdcacheError(f"cannot decode image {where}: {e}") from None


DECODE_RULE = "PIL.Image.open().convert('RGB')"
