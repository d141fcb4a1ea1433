"""Resolve a language-model distill run: the token cache, the student, the shared tokenizer,
training and held-out rows, the loss. Everything is checked here, before a file is written."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kdcache.cache.errors import KdcacheError
from kdcache.distill.config import DistillConfig

log = logging.getLogger(__name__)


@dataclass
class LMRun:
    model: object
    info: dict
    tokenizer: object
    cache: object | None
    train: object  # CacheRows | CorpusRows
    test: object | None  # CorpusRows
    loss_fn: object
    max_length: int


def is_lm_run(cfg: DistillConfig) -> bool:
    """A token cache, or no cache and a causal-LM student (plain LM training)."""
    if cfg.caches:
        from kdcache.cache.tokens import is_token_cache

        return is_token_cache(cfg.caches[0], cfg.storage_options or None)
    from kdcache.models.lmstudent import is_causal_lm

    return is_causal_lm(cfg.student)


def _loss(cfg: DistillConfig):
    from kdcache.distill.lmloss import get_lm_loss, lm_loss_needs_teacher

    try:
        return get_lm_loss(cfg.loss, **cfg.hparams), lm_loss_needs_teacher(cfg.loss)
    except ValueError as e:
        raise KdcacheError(str(e)) from None


def _refuse_unsupported(cfg: DistillConfig) -> None:
    from kdcache.distill.checkpoint import _flag

    if len(cfg.caches) > 1:
        raise KdcacheError("--cache: a language-model student distills from one token cache; "
                           f"got {len(cfg.caches)}")  # fmt: skip
    unsupported = (("teacher", None), ("weights", None), ("fill_missing", False),
                   ("ema", False), ("label_smoothing", 0.0), ("pretrained", False))  # fmt: skip
    for name, default in unsupported:
        if getattr(cfg, name) != default:
            raise KdcacheError(
                f"{_flag(name)} is not supported for language-model students (token caches); "
                "give the student's weights as hf:DIR"
            )


def _corpus(cfg: DistillConfig, split: str, tok, max_length: int, vocab: int, limit=None):
    """One split of --dataset (or a file given as the split) tokenized into windows."""
    from kdcache.data.lmtext import iter_rows, tokenize_corpus

    root = cfg.data_root
    if os.path.isfile(split):  # a held-out file: --test-split heldout.jsonl
        root, split = split, Path(split).stem
    rows = iter_rows(cfg.dataset, root, split, cfg.text_column)
    return tokenize_corpus(rows, tok, max_length, vocab, limit)


def _tokenizer(cfg: DistillConfig, cache, info: dict):
    """The cache's tokenizer (the student's own must be the same), or the student's."""
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(info["tokenizer_dir"]) if info["tokenizer_dir"] else None
    if cache is None:
        if own is None:
            raise KdcacheError(f"--student {cfg.student!r} has no tokenizer files; training "
                               "without a token cache needs the student's tokenizer")  # fmt: skip
        return own
    tok = AutoTokenizer.from_pretrained(cache.tokenizer_dir())
    bad = tokenizer_mismatch(cfg.student, own, info["vocab_size"], cache, tok)
    if bad is not None:
        raise KdcacheError(bad)
    return tok


def tokenizer_mismatch(student: str, own, vocab_size: int, cache, tok) -> str | None:
    """Why `student` (its own tokenizer or None, its vocabulary size) cannot train on the
    cache's tokenizer `tok`, as one error message; None when it can."""
    from kdcache.models.lmstudent import same_tokenizer

    why = None if own is None else same_tokenizer(own, tok)
    if why is None and vocab_size < cache.vocab_size:
        why = f"its vocabulary has {vocab_size} ids, the cache's {cache.vocab_size}"
    if why is None:
        return None
    teacher = (cache.spec.get("teacher") or {}).get("name", "?")
    return (
        f"student {student!r} and the cache's teacher {teacher!r} do not share a "
        f"tokenizer ({why}); a token cache trains students on the teacher's tokenizer"
    )


def _check_dataset(cfg: DistillConfig, cache, tok) -> None:
    """--data-root given with a cache: its windows must be the cache's (fingerprint)."""
    if cfg.data_root is None:
        return
    c = _corpus(cfg, cfg.split, tok, int(cache.max_length), int(cache.vocab_size))
    try:
        want = cache.spec["dataset"].get("fingerprint")
        if want is not None and c.fingerprint != want:
            raise KdcacheError(
                f"--dataset {cfg.dataset} --data-root {cfg.data_root} --split {cfg.split} is not "
                f"the data of the cache {cache.path} (fingerprint {c.fingerprint[:12]} vs "
                f"{want[:12]}); give the corpus the cache was computed on"
            )
    finally:
        c.close()


def build_lm_run(cfg: DistillConfig, rt) -> LMRun:
    from kdcache.distill.lmdata import CacheRows, CorpusRows
    from kdcache.models.lmstudent import create_lm_student

    _refuse_unsupported(cfg)
    if cfg.batch_size < rt.world_size:
        raise KdcacheError(f"--batch-size {cfg.batch_size} is smaller than the world size "
                           f"{rt.world_size}; it is the global batch")  # fmt: skip
    loss_fn, needs_teacher = _loss(cfg)
    if needs_teacher and not cfg.caches:
        raise KdcacheError(f"--loss {cfg.loss} needs the teacher's targets: give --cache PATH "
                           "(a token cache)")  # fmt: skip
    cache = None
    if cfg.caches:
        from kdcache.cache.tokens import open_token_cache

        cache = open_token_cache(cfg.caches[0], cfg.storage_options or None)
    model, info = create_lm_student(cfg.student)
    tok = _tokenizer(cfg, cache, info)
    max_length = int(cache.max_length) if cache is not None else int(cfg.max_length)
    limit = info["max_positions"]
    if limit is not None and max_length > limit:
        raise KdcacheError(f"max length {max_length} exceeds the student's {limit} positions "
                           f"(--student {cfg.student!r})")  # fmt: skip
    vocab = info["vocab_size"]
    if cache is not None:
        _check_dataset(cfg, cache, tok)
        train = CacheRows(cache, int(cfg.memory_budget_gb * (1 << 30)))
    else:
        if cfg.data_root is None and cfg.dataset == "text":
            raise KdcacheError("--dataset text needs --data-root FILE.jsonl|csv or a DIR")
        train = CorpusRows(_corpus(cfg, cfg.split, tok, max_length, vocab, cfg.max_samples))
    test = None
    if cfg.test_split and cfg.test_split != "none":
        try:
            test = CorpusRows(_corpus(cfg, cfg.test_split, tok, max_length, vocab))
        except KdcacheError as e:
            if "no split" not in str(e) and "not exist" not in str(e):
                raise
            raise KdcacheError(f"{e} (--test-split SPLIT or FILE, or none to skip the held-out "
                               "evaluation)") from None  # fmt: skip
    return LMRun(model, info, tok, cache, train, test, loss_fn, max_length)
