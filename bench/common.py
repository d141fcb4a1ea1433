"""Shared by the benches: synthetic data in the real CIFAR-100 pickle layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar100(root: Path, n: int, seed: int = 0) -> None:
    """Random uint8 images in CIFAR-100's python-pickle layout (train: n, test: 16)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train", n), ("test", 16)):
        labels = [int(v) for v in rng.integers(0, 100, count)]
        data = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [v // 5 for v in labels],
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(data, f, protocol=4)
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=4)


def write_jpegs(root: Path, n: int, size: int = 256, classes: int = 100, seed: int = 0) -> None:
    """n synthetic JPEGs in imagefolder layout (root/train/<class>/<i>.jpg): smooth random
    colour fields (8x8 noise upsampled), ~10-20 KB each like downsized photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        img.save(folder / f"{i:06d}.jpg", quality=90)
