"""What a language-model distill run needs before training: is this an LM run, the student
(``hf:`` directory with weights, or with a config only: random init), its tokenizer checked
against the cache's, the token cache, the held-out windows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)

_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json")  # fmt: skip
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _hf_dir(student: str) -> Path | None:
    if not student.startswith("hf:"):
        return None
    p = Path(student[3:])
    return p if (p / "config.json").is_file() else None


def is_causal_lm_dir(student: str) -> bool:
    """An `hf:` directory whose config names a causal-LM head (GPT-2, Llama, Qwen, ...)."""
    d = _hf_dir(student)
    if d is None:
        return False
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def token_cache_of(path: str, storage_options: dict | None = None):
    """The opened token cache at `path`, or None when it is not one (or lmstore is absent)."""
    try:
        from kdcache.cache.tokens import is_token_cache, open_token_cache
    except ImportError:
        return None
    if not is_token_cache(path, storage_options or None):
        return None
    return open_token_cache(path, storage_options or None)


def is_lm_run(cfg) -> bool:
    """Dispatch of `distill`: a token cache, or a causal-LM student without any cache."""
    caches = list(cfg.caches)
    if caches:
        return token_cache_of(caches[0], cfg.storage_options) is not None
    return is_causal_lm_dir(cfg.student)


def load_student(student: str, seed: int):
    """(model, student directory). Weights present: loaded; config only: seeded random init."""
    d = _hf_dir(student)
    if d is None:
        raise KdcacheError(
            f"--student {student!r}: a language-model student must be hf:DIR with a config.json "
            "(weights optional: a config alone gives a randomly initialised model)"
        )
    if not is_causal_lm_dir(student):
        raise KdcacheError(
            f"--student {student!r} is not a causal LM (its config.json architectures lack "
            "*ForCausalLM / *LMHeadModel); expected a causal-LM student for a token cache"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if any((d / w).is_file() for w in _WEIGHTS):
        return AutoModelForCausalLM.from_pretrained(str(d)), d
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d))), d


def _tokenizer_at(d) -> object:
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoTokenizer.from_pretrained(str(d))


def _fingerprint(tok) -> tuple:
    return (len(tok), tuple(sorted(tok.get_vocab().items())), tok.eos_token, tok.bos_token)


def student_tokenizer(student: str, d: Path, cache):
    """The student's tokenizer; with a cache it must be the teacher's (same vocabulary and
    specials), else one error naming both. A student directory without tokenizer files
    uses the cache's."""
    own = any((d / f).is_file() for f in _TOKENIZER)
    if cache is None:
        if not own:
            raise KdcacheError(
                f"--student {student!r} has no tokenizer files and no --cache gives one"
            )
        return _tokenizer_at(d)
    teacher_tok = _tokenizer_at(cache.tokenizer_dir())
    if not own:
        return teacher_tok
    tok = _tokenizer_at(d)
    if _fingerprint(tok) != _fingerprint(teacher_tok):
        sha = _cache_tokenizer_sha(cache)
        raise KdcacheError(
            f"--student {student!r} has another tokenizer (vocab {len(tok)}) than the teacher "
            f"of --cache {cache_name(cache)!r} (vocab {len(teacher_tok)}, tokenizer sha256 "
            f"{sha[:12]}); teacher and student must share the tokenizer"
        )
    return tok


def cache_name(cache) -> str:
    return str(getattr(cache, "path", None) or getattr(cache, "url", None) or cache.key[:12])


def _cache_tokenizer_sha(cache) -> str:
    """The tokenizer sha256 recorded in the spec (wherever the writer put it)."""
    stack = [cache.spec]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                if "tokenizer" in k and "sha" in k and isinstance(v, str):
                    return v
                stack.append(v)
    return "?"


def check_student_fits(model, student: str, vocab: int, max_length: int) -> None:
    """The student must embed every id of the vocabulary and every position of a row."""
    cfg = model.config
    n = int(getattr(cfg, "vocab_size", 0) or 0)
    if n < vocab:
        raise KdcacheError(
            f"--student {student!r} has vocab_size {n} < {vocab} token ids of the tokenizer"
        )
    pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if pos is not None and max_length > int(pos):
        raise KdcacheError(
            f"rows of {max_length} tokens exceed the student's {pos} positions ({student!r})"
        )


def heldout_windows(cfg, tok, max_length: int):
    """Held-out token windows: --test-split FILE, or DIR/<test-split>.jsonl|csv of
    --data-root; None with --test-split none or when a single training file gives no split."""
    from kdcache.distill.lmdata import read_text_rows, token_windows

    split = cfg.test_split
    if split in (None, "", "none"):
        return None
    if Path(split).is_file():
        root, split = split, "test"
    elif cfg.data_root is not None and Path(cfg.data_root).is_dir():
        root = cfg.data_root
    else:
        log.warning("no held-out data: give --test-split FILE (or a --data-root DIR/%s.jsonl)",
                    split)  # fmt: skip
        return None
    _, texts = read_text_rows(root, split)
    return token_windows(tok, texts, max_length)
