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


def tiny_bert(out: Path, texts: list[str], num_labels: int = 3) -> Path:
    """A BertForSequenceClassification (hidden 32, 2 layers) and a WordPiece tokenizer
    trained on ``texts``, both saved with save_pretrained into ``out`` (tests, bench)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        list(texts),
        trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    return out
