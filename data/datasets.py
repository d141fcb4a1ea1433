"""Raw, un-augmented datasets held in RAM: uint8 images ``(N,3,H,W)`` or texts.

Views (``data.views``) run batched on these tensors, so all images of one dataset share
one raw size: CIFAR and digits are 32x32; an image folder is decoded once and resized to
``image_size`` (default 64) — choose it >= the largest view you will cut from it.
Keys are stable strings (``cifar100/train/00042``, relative file paths, text ids) and, with the
labels, make the dataset fingerprint stored in a cache spec. CIFAR files are read with
torchvision's own classes but without its md5 check (present files suffice), so re-packed
copies and test fixtures load too.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.errors import KdcacheError
from cache.spec import dataset_fingerprint

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits", "text")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class RawDataset:
    """Raw samples in RAM; ``get`` returns a raw batch for a view policy."""

    name: str
    split: str
    keys: list[str]
    labels: np.ndarray
    num_classes: int
    modality: str = "image"
    images: torch.Tensor | None = None
    texts: list[str] | None = None
    classes: list[str] | None = field(default=None)

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
        return self.images[torch.from_numpy(idx)]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    max_samples: int | None = None,
    **kw,
) -> RawDataset:
    """Load ``name`` (cifar10|cifar100|imagefolder|digits|text) into RAM.

    ``max_samples`` keeps the first N samples (keys keep their original indices).
    kw: ``image_size`` and ``resize`` ("squash"|"center-crop") for imagefolder,
    ``num_classes``/``classes`` for text.
    """
    loaders = {
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "imagefolder": _load_imagefolder,
        "digits": _load_digits,
        "text": _load_text,
    }
    if name not in loaders:
        raise KdcacheError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    ds = loaders[name](name, root, split, download, **kw)
    if max_samples is not None and max_samples < len(ds):
        ds = _head(ds, max_samples)
    log.info("loaded %s/%s: %d samples, %d classes", name, split, len(ds), ds.num_classes)
    return ds


def _head(ds: RawDataset, n: int) -> RawDataset:
    return RawDataset(
        ds.name,
        ds.split,
        ds.keys[:n],
        ds.labels[:n],
        ds.num_classes,
        ds.modality,
        None if ds.images is None else ds.images[:n].clone(),
        None if ds.texts is None else ds.texts[:n],
        ds.classes,
    )


def _default_root(root) -> str:
    return str(root if root is not None else os.environ.get("KDCACHE_DATA", "data"))


def _check_split(name: str, split: str, allowed=("train", "test")) -> None:
    if split not in allowed:
        raise KdcacheError(f"{name} has splits {', '.join(allowed)}, not {split!r}")


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


def _load_imagefolder(name: str, root, split: str, download: bool, **kw) -> RawDataset:
    """root/<split>/<class>/* if root/<split> exists, else root/<class>/*; keys relative to root."""
    if root is None:
        raise KdcacheError(
            "imagefolder needs --data-root DIR (DIR/<class>/*.png or DIR/<split>/<class>/...)"
        )
    root_p = Path(root)
    base = root_p / split if (root_p / split).is_dir() else root_p
    if not base.is_dir():
        raise KdcacheError(f"image folder {str(root_p)!r} does not exist")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    files: list[tuple[Path, int]] = []
    for c, cls in enumerate(classes):
        for p in sorted((base / cls).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                files.append((p, c))
    if not files:
        raise KdcacheError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(base)!r}/<class>/"
        )
    files.sort(key=lambda fc: fc[0].relative_to(root_p).as_posix())
    size = int(kw.get("image_size", 64))
    mode = kw.get("resize", "squash")
    if mode not in ("squash", "center-crop"):
        raise KdcacheError(f"resize must be 'squash' or 'center-crop', not {mode!r}")
    workers = int(kw.get("num_workers", min(8, os.cpu_count() or 1)))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        arrays = list(pool.map(lambda fc: _decode(fc[0], size, mode), files))
    images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    keys = [p.relative_to(root_p).as_posix() for p, _ in files]
    labels = np.asarray([c for _, c in files], dtype=np.int64)
    return RawDataset(name, split, keys, labels, len(classes), "image", images, None, classes)


def _decode(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if mode == "center-crop":
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except OSError as e:
        raise KdcacheError(f"cannot decode image {str(path)!r}: {e}") from e


def _text_files(root, split: str) -> tuple[Path, list[Path]]:
    if root is None:
        raise KdcacheError(
            "text needs --data-root FILE.jsonl|FILE.csv or a DIR with <split>.jsonl|csv"
        )
    p = Path(root)
    if p.is_file():
        return p, [p]
    for ext in (".jsonl", ".csv"):
        if (p / f"{split}{ext}").is_file():
            siblings = sorted(q for q in p.iterdir() if q.suffix in (".jsonl", ".csv"))
            return p / f"{split}{ext}", siblings
    raise KdcacheError(f"no {split}.jsonl or {split}.csv under {str(p)!r}")


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot read {str(path)!r}: {e}") from e
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "text" not in r or "label" not in r:
            raise KdcacheError(f"{str(path)!r} row {i} lacks a 'text' or 'label' field")
    return rows


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _load_text(name: str, root, split: str, download: bool, **kw) -> RawDataset:
    """Rows with text + label (int, or string mapped to sorted classes over all split files)."""
    path, siblings = _text_files(root, split)
    rows = _read_rows(path)
    ints = [_as_int(r["label"]) for r in rows]
    classes = kw.get("classes")
    if classes is None and all(v is not None for v in ints):
        labels = np.asarray(ints, dtype=np.int64)
        num_classes = int(kw.get("num_classes") or (labels.max() + 1 if len(labels) else 0))
    else:
        if classes is None:
            every = {str(r["label"]) for f in siblings for r in _read_rows(f)}
            classes = sorted(every)
        index = {c: i for i, c in enumerate(classes)}
        missing = sorted({str(r["label"]) for r in rows} - set(index))
        if missing:
            raise KdcacheError(
                f"labels {missing[:5]} of {str(path)!r} are not in classes {classes}"
            )
        labels = np.asarray([index[str(r["label"])] for r in rows], dtype=np.int64)
        num_classes = len(classes)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdcacheError(f"labels of {str(path)!r} must lie in [0, {num_classes})")
    keys = [str(r["id"]) if r.get("id") not in (None, "") else str(i) for i, r in enumerate(rows)]
    if len(set(keys)) != len(keys):
        raise KdcacheError(f"{str(path)!r} has duplicate ids; keys must be unique")
    texts = [str(r["text"]) for r in rows]
    return RawDataset(name, split, keys, labels, num_classes, "text", None, texts, classes)


def raw_batch(dataset, samples: np.ndarray):
    """Raw inputs of `samples`: token ids once a text dataset is tokenized, else images."""
    tokens = getattr(dataset, "tokens", None)
    if tokens is not None:
        return tokens[torch.from_numpy(np.asarray(samples, dtype=np.int64))]
    return dataset.get(samples)
