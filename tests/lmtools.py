"""Tiny causal-LM fixtures for token-cache tests (no downloads): a byte-level BPE tokenizer
trained here and a 2-layer GPT-2 built from a config, saved with save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

WORDS = ("the cat sat on the mat while a dog ran in the park and birds sang over green "
         "hills near rivers where fish swim under old bridges built of stone").split()  # fmt: skip

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words + 1))
        out.append(" ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), k)) + ".")
    return out


def make_tokenizer(out: Path, vocab_size: int = 300, chat: bool = True):
    """A byte-level BPE (GPT-2 style) fast tokenizer trained on the fixture words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus_texts(200) + [" ".join(WORDS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_teacher(
    out: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64,
    vocab_size: int = 300,
) -> Path:  # fmt: skip
    """A random 2-layer GPT-2 LM + its tokenizer in `out` (hf:OUT loads it)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper than init: top-k differs from uniform
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    return out


def write_corpus(path: Path, n: int, seed: int = 0, **kw) -> Path:
    path = Path(path)
    os.makedirs(path.parent, exist_ok=True)
    with open(path, "w") as f:
        for i, t in enumerate(corpus_texts(n, seed, **kw)):
            f.write(json.dumps({"id": f"doc{i}", "text": t}) + "\n")
    return path
