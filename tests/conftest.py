"""Shared, session-scoped factories for tiny test data (no downloads, ever).

Factories return paths; calling one twice with the same arguments returns the same directory.
  make_cifar(kind="cifar10"|"cifar100", n_train=50, n_test=20) -> root for torchvision/load_dataset
  make_imagefolder(n_per_class=3, classes=("cat","dog"), size=(20,16), split="train"|None) -> root
  make_text_file(fmt="jsonl"|"csv", n=24, string_labels=False, with_ids=False) -> file path
  tiny_texts -> list of (text, label) pairs; tiny_bert_dir -> dir with a 3-class BERT + tokenizer
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the network: hub libraries answer from the (empty) local cache at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_WORDS = {
    0: "good great fine happy nice lovely superb",
    1: "bad awful poor sad terrible nasty grim",
    2: "table chair window door floor wall roof",
}


def cifar_arrays(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Deterministic uint8 rows (n, 3072) in CIFAR's channel-major layout, and labels."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return data, labels


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: Path, kind: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write CIFAR-10/100 in the real python-pickle batch layout, with meta files."""
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        data, labels = cifar_arrays(n_train, 10, seed)
        parts = np.array_split(np.arange(n_train), 5)
        for b, idx in enumerate(parts, start=1):
            _dump(
                folder / f"data_batch_{b}",
                {
                    "batch_label": f"training batch {b} of 5",
                    "labels": [labels[i] for i in idx],
                    "data": data[idx],
                    "filenames": [f"img_{i}.png" for i in idx],
                },
            )
        tdata, tlabels = cifar_arrays(n_test, 10, seed + 1)
        _dump(
            folder / "test_batch",
            {
                "batch_label": "testing batch 1 of 1",
                "labels": tlabels,
                "data": tdata,
                "filenames": [f"t_{i}.png" for i in range(n_test)],
            },
        )
        _dump(
            folder / "batches.meta",
            {
                "label_names": [f"class{i}" for i in range(10)],
                "num_cases_per_batch": max(1, n_train // 5),
                "num_vis": 3072,
            },
        )
    elif kind == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
            data, labels = cifar_arrays(n, 100, s)
            _dump(
                folder / name,
                {
                    "batch_label": name,
                    "fine_labels": labels,
                    "coarse_labels": [v // 5 for v in labels],
                    "data": data,
                    "filenames": [f"{name}_{i}.png" for i in range(n)],
                },
            )
        _dump(
            folder / "meta",
            {
                "fine_label_names": [f"fine{i}" for i in range(100)],
                "coarse_label_names": [f"coarse{i}" for i in range(20)],
            },
        )
    else:
        raise ValueError(kind)
    return root


@pytest.fixture(scope="session")
def make_cifar(tmp_path_factory):
    made: dict[tuple, Path] = {}

    def factory(kind: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
        key = (kind, n_train, n_test, seed)
        if key not in made:
            made[key] = write_cifar(tmp_path_factory.mktemp(kind), kind, n_train, n_test, seed)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def make_imagefolder(tmp_path_factory):
    """PNG folder root/<split>/<class>/<i>.png (or root/<class>/... with split=None)."""
    from PIL import Image

    made: dict[tuple, Path] = {}

    def factory(
        n_per_class: int = 3,
        classes=("cat", "dog"),
        size=(20, 16),
        split: str | None = "train",
        seed: int = 0,
    ) -> Path:
        key = (n_per_class, tuple(classes), tuple(size), split, seed)
        if key in made:
            return made[key]
        root = tmp_path_factory.mktemp("imagefolder")
        base = root / split if split else root
        rng = np.random.default_rng(seed)
        for cls in classes:
            (base / cls).mkdir(parents=True)
            for i in range(n_per_class):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(base / cls / f"{i:03d}.png")
        made[key] = root
        return root

    return factory


@pytest.fixture(scope="session")
def tiny_texts() -> list[tuple[str, int]]:
    """Short sentences with 3 learnable classes (word lists per class), deterministic."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = i % 3
        words = _WORDS[label].split()
        rows.append((" ".join(rng.choice(words, size=3 + i % 6)), label))
    return rows


@pytest.fixture(scope="session")
def make_text_file(tmp_path_factory, tiny_texts):
    made: dict[tuple, Path] = {}

    def factory(
        fmt: str = "jsonl",
        n: int = 24,
        string_labels: bool = False,
        with_ids: bool = False,
        name: str = "train",
    ) -> Path:
        key = (fmt, n, string_labels, with_ids, name)
        if key in made:
            return made[key]
        path = tmp_path_factory.mktemp("text") / f"{name}.{fmt}"
        rows = []
        for i, (text, label) in enumerate(tiny_texts[:n]):
            row = {"text": text, "label": ["pos", "neg", "obj"][label] if string_labels else label}
            if with_ids:
                row = {"id": f"doc-{i:03d}", **row}
            rows.append(row)
        with open(path, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        made[key] = path
        return path

    return factory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_texts) -> Path:
    """A 3-class BertForSequenceClassification (hidden 32, 2 layers) and a WordPiece
    tokenizer trained on ``tiny_texts``, both saved with save_pretrained."""
    from tests.datatools import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"), [t for t, _ in tiny_texts])


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 LM + locally trained BPE tokenizer (tests/lmtools.py), hf:DIR loads it."""
    from tests.lmtools import make_teacher

    return make_teacher(tmp_path_factory.mktemp("tiny_lm") / "teacher")


@pytest.fixture(scope="session")
def lm_corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of 40 rows `{"id", "text"}` (short and long docs)."""
    from tests.lmtools import write_corpus

    return write_corpus(tmp_path_factory.mktemp("lm_corpus") / "corpus.jsonl", 40)
