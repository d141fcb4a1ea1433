"""Test data for the streaming sources: JPEG folders of mixed sizes, HF datasets, tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np


def jpeg_bytes(w: int, h: int, seed: int) -> bytes:
    """A smooth random JPEG (JPEG of pure noise is large and slow)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 25), max(2, w // 25), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Mixed native sizes, ~300x200 to 500x400."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(300, 501)), int(rng.integers(200, 401))) for _ in range(n)]


def make_jpeg_folder(
    root: Path, classes=("a", "b"), per_class: int = 3, split: str | None = "train", seed: int = 0
) -> Path:
    """root/<split>/<class>/NNN.jpg (class-sorted, as ImageNet folders are)."""
    base = root / split if split else root
    wh = sizes(len(classes) * per_class, seed)
    for c, cls in enumerate(classes):
        (base / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = wh[c * per_class + i]
            (base / cls / f"{i:03d}.jpg").write_bytes(jpeg_bytes(w, h, seed * 1000 + c * 100 + i))
    return root


def write_shard(path: Path | io.BytesIO, samples: list[tuple[str, bytes, int]], ext="jpg") -> None:
    """A WebDataset tar: KEY.<ext> + KEY.cls per sample."""
    with (
        tarfile.open(fileobj=path, mode="w")
        if isinstance(path, io.BytesIO)
        else tarfile.open(path, "w") as tf
    ):
        for key, data, label in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def image_samples(n: int, n_classes: int = 3, seed: int = 0) -> list[tuple[str, bytes, int]]:
    return [
        (f"s{i:04d}", jpeg_bytes(w, h, seed + i), i % n_classes)
        for i, (w, h) in enumerate(sizes(n, seed))
    ]


def hf_image_dataset(n: int = 6, seed: int = 0):
    """A datasets.Dataset with an Image column (JPEG bytes) and a ClassLabel column."""
    import datasets

    samples = image_samples(n, 3, seed)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])}
    )
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for _, b, _ in samples],
         "label": [lab for _, _, lab in samples]},
        features=features,
    )  # fmt: skip
