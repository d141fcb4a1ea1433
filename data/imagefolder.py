"""``imagefolder``: ``root/<split>/<class>/*`` (or ``root/<class>/*`` as the only, training,
split), decoded lazily one file at a time at native resolution; keys = paths relative to root.

Opening lists file names only (no decode, no stat of each file), so start-up and memory are
a few hundred bytes per image whatever the image sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from kdcache.cache.errors import KdcacheError
from kdcache.data.base import DECODE_RULE, SourceBase, decode_image, missing_split
from kdcache.data.datasets import register_source

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLIT_NAMES = ("train", "val", "validation", "test", "valid")


def _list_images(folder: str) -> list[str]:
    """Every image file under ``folder`` (recursive), as paths relative to ``folder``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(f if rel == "." else f"{rel}/{f}")
    return out


class ImageFolder(SourceBase):
    """Lazy image folder: ``load(i)`` decodes file ``i`` to an RGB PIL image."""

    decode_rule = DECODE_RULE

    def __init__(self, root: str, split: str) -> None:
        root_p = Path(root)
        if not root_p.is_dir():
            raise KdcacheError(f"image folder {str(root_p)!r} does not exist")
        subdirs = sorted(p.name for p in root_p.iterdir() if p.is_dir())
        if (root_p / split).is_dir():
            base, prefix = root_p / split, f"{split}/"
        else:
            splits = [d for d in subdirs if d in SPLIT_NAMES]
            if splits or split != "train":
                have = splits or ["train (the class folders directly under the root)"]
                raise missing_split(f"image folder {str(root_p)!r}", split, have)
            base, prefix = root_p, ""
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        keys, labels = [], []
        for c, cls in enumerate(classes):
            files = _list_images(str(base / cls))
            keys += [f"{prefix}{cls}/{f}" for f in files]
            labels += [c] * len(files)
        if not keys:
            raise KdcacheError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(base)!r}/<class>/"
            )
        self.name, self.split, self.root = "imagefolder", split, str(root_p)
        self.keys, self.labels = keys, np.asarray(labels, dtype=np.int64)
        self.classes, self.num_classes = classes, len(classes)

    def load(self, i: int):
        path = os.path.join(self.root, self.keys[int(i)])
        return decode_image(path, repr(path))


@register_source("imagefolder", help="DIR/<split>/<class>/*.jpg (or DIR/<class>/*), lazy decode")
def _open_imagefolder(name: str, root, split: str, download: bool, **kw) -> ImageFolder:
    if root is None:
        raise KdcacheError(
            "imagefolder needs --data-root DIR (DIR/<split>/<class>/*.jpg or DIR/<class>/*)"
        )
    return ImageFolder(str(root), split)
