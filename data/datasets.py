"""Dataset sources, one registry: ``SOURCES`` (``@register_source``), and ``load_dataset``.

Small datasets stay in RAM as uint8 tensors (``cifar10``, ``cifar100``, ``digits``: 32x32,
the fast batched view path); everything else streams (``imagefolder``, ``hfds:``, ``wds:``,
``text``): keys and labels are listed up front (they make the dataset fingerprint of a cache
spec), samples are decoded one at a time at native resolution when a view is cut from them.
CIFAR files are read with torchvision's own classes but without its md5 check (present files
suffice), so re-packed copies and test fixtures load too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.cache.spec import dataset_fingerprint
from kdcache.data.base import lookup, missing_split, registry_decorator

log = logging.getLogger(__name__)

SOURCES: dict = {}
register_source = registry_decorator(SOURCES, "dataset source")


@dataclass
class RawDataset:
    """An in-RAM image dataset (uint8 ``(N,3,H,W)``); ``get`` returns a batch for a view
    policy, ``load`` one sample as an RGB PIL image (for per-sample policies)."""

    name: str
    split: str
    keys: list[str]
    labels: np.ndarray
    num_classes: int
    modality: str = "image"
    images: torch.Tensor | None = None
    texts: list[str] | None = None
    classes: list[str] | None = field(default=None)
    in_ram = True

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.keys, np.asarray(self.labels, dtype=np.int64))

    def spec(self) -> dict:
        """The ``dataset`` section of a cache spec."""
        return {
            "name": self.name,
            "split": self.split,
            "n": len(self),
            "fingerprint": self.fingerprint(),
        }

    def get(self, indices) -> torch.Tensor | list[str]:
        """uint8 ``(B,3,H,W)`` images or a list of B texts for sample ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.modality == "text":
            return [self.texts[i] for i in idx]
        if self.images.device.type == "cpu":  # numpy gather: no OpenMP team in this thread
            return torch.from_numpy(self.images.numpy()[idx])
        return self.images[torch.from_numpy(idx).to(self.images.device)]

    def load(self, i: int):
        if self.modality == "text":
            return self.texts[int(i)]
        from PIL import Image

        return Image.fromarray(self.images[int(i)].permute(1, 2, 0).numpy())

    def head(self, n: int) -> None:
        self.keys, self.labels = self.keys[:n], self.labels[:n]
        if self.images is not None:
            self.images = self.images[:n].clone()
        if self.texts is not None:
            self.texts = self.texts[:n]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    max_samples: int | None = None,
    **kw,
):
    """Open source ``name`` (a ``SOURCES`` key; ``hfds:PATH``/``wds:URL`` carry their path).

    ``max_samples`` keeps the first N samples (keys keep their original indices).
    kw by source: ``image_column``/``text_column``/``label_column`` (hfds), ``classes`` /
    ``num_classes`` (text), ``storage_options`` (wds over fsspec).
    """
    _register_streaming()
    factory = lookup(SOURCES, name, "dataset")
    ds = factory(name, root, split, download, **kw)
    if max_samples is not None and max_samples < len(ds):
        ds.head(max_samples)
    log.info("opened %s/%s: %d samples, %d classes", name, split, len(ds), ds.num_classes)
    return ds


def _register_streaming() -> None:
    """The streaming sources live in their own modules; importing them registers them."""
    import kdcache.data.hfds  # noqa: F401
    import kdcache.data.imagefolder  # noqa: F401
    import kdcache.data.text  # noqa: F401
    import kdcache.data.wds  # noqa: F401


def _default_root(root) -> str:
    return str(root if root is not None else os.environ.get("KDCACHE_DATA", "data"))


def _check_split(name: str, split: str, allowed=("train", "test")) -> None:
    if split not in allowed:
        raise missing_split(name, split, list(allowed))


@register_source("cifar100", help="CIFAR-100 python pickles under --data-root (in RAM)")
@register_source("cifar10", help="CIFAR-10 python pickles under --data-root (in RAM)")
def _load_cifar(name: str, root, split: str, download: bool, **kw) -> RawDataset:
    import torchvision

    _check_split(name, split)
    root = _default_root(root)
    base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100

    class _Cifar(base):  # type: ignore[misc, valid-type]
        """md5=None: files present is enough, so re-packed or test copies load too."""

        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    try:
        tv = _Cifar(root, train=split == "train", download=download)
    except RuntimeError as e:
        raise KdcacheError(
            f"{name} not found under {root!r} (expected {root}/{base.base_folder}); "
            "pass --download to fetch it"
        ) from e
    except OSError as e:  # download without network, unwritable root
        raise KdcacheError(f"cannot download {name} into {root!r}: {e}") from e
    images = torch.from_numpy(np.ascontiguousarray(tv.data.transpose(0, 3, 1, 2)))
    labels = np.asarray(tv.targets, dtype=np.int64)
    keys = [f"{name}/{split}/{i:05d}" for i in range(len(labels))]
    n_cls = 10 if name == "cifar10" else 100
    return RawDataset(name, split, keys, labels, n_cls, "image", images, None, list(tv.classes))


@register_source("digits", help="sklearn's bundled 8x8 digits, upscaled to 32x32 (in RAM)")
def _load_digits(name: str, root, split: str, download: bool, **kw) -> RawDataset:
    """sklearn's bundled 8x8 digits, x4 nearest upscale to 32x32 RGB; test = index % 5 == 4."""
    from sklearn.datasets import load_digits

    _check_split(name, split)
    d = load_digits()
    idx = np.arange(len(d.target))
    idx = idx[(idx % 5 == 4) == (split == "test")]
    img = np.rint(d.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = img.repeat(4, axis=1).repeat(4, axis=2)  # (n, 32, 32)
    images = torch.from_numpy(np.ascontiguousarray(np.repeat(img[:, None], 3, axis=1)))
    keys = [f"digits/{split}/{i:05d}" for i in idx]
    labels = d.target[idx].astype(np.int64)
    return RawDataset(
        name, split, keys, labels, 10, "image", images, None, [str(c) for c in range(10)]
    )
