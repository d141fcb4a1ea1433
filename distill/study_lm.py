"""`kdcache study` on token caches: which kind of student a study trains, and the checks of an
LM study that must pass before any run is launched.

A study is an LM study when its caches are token caches (or, without a cache, when every
student is a causal LM): each run is then the LM distill (`distill.lm`, dispatched on the
cache), its losses come from the LM registry (`distill.lmloss`: ce, kd), and the study's metric
is the final epoch's held-out perplexity ``test_ppl`` (lower is better) instead of test accuracy.
"""

from __future__ import annotations

from kdcache.cache.errors import KdcacheError

LM_METRIC = "test_ppl"
CLS_METRIC = "test_acc"


def study_task(spec) -> str:
    """ "lm" or "classifier"; refuses a study that mixes the two (caches or students)."""
    from kdcache.cache.tokens import is_token_cache
    from kdcache.models.lmstudent import is_causal_lm

    caches = list(dict.fromkeys(c for c in [spec.cache, *spec.loss_cache.values()] if c))
    storage = spec.distill.get("storage_options") or None
    tokens = {c: is_token_cache(c, storage) for c in caches}
    if len(set(tokens.values())) > 1:
        tok = next(c for c, t in tokens.items() if t)
        cls = next(c for c, t in tokens.items() if not t)
        raise KdcacheError(
            f"--cache/--loss-cache mix a token cache ({tok}) and a classification cache ({cls}); "
            "a study trains one kind of student"
        )
    causal = {s: is_causal_lm(s) for s in spec.students}
    lm = any(tokens.values()) if caches else bool(causal) and all(causal.values())
    if lm:
        bad = next((s for s, c in causal.items() if not c), None)
        if bad is not None:
            raise KdcacheError(
                f"--students {bad!r} is not a causal language model; a study on token caches "
                "trains LM students: expected hf:DIR holding a causal-LM config"
            )
    elif not caches and any(causal.values()):
        lms = [s for s, c in causal.items() if c]
        others = [s for s, c in causal.items() if not c]
        raise KdcacheError(
            f"--students mixes causal LMs ({lms[0]}) and classifiers ({others[0]}); "
            "a study trains one kind of student"
        )
    return "lm" if lm else "classifier"


def lm_loss_defaults(loss: str) -> tuple[dict, bool]:
    """The LM loss's default hyper-parameters and whether it needs the teacher's targets."""
    from kdcache.distill.lmloss import LM_LOSSES

    if loss not in LM_LOSSES:
        raise KdcacheError(
            f"--losses {loss}: not a loss for language-model students (token caches); "
            f"expected {', '.join(sorted(LM_LOSSES))}"
        )
    d = LM_LOSSES[loss]
    return dict(d.defaults), d.needs_teacher


def check_lm_hparams(loss: str, hp: dict) -> dict:
    """Defaults + ``hp`` checked by the LM registry (T > 0, alpha in [0, 1])."""
    from kdcache.distill.lmloss import lm_hparams

    try:
        return lm_hparams(loss, hp)
    except ValueError as e:
        raise KdcacheError(f"--hparam: {e}") from None


def check_lm_config(cfg, read: bool = False) -> None:
    """What an LM run refuses at its start, refused before the study launches anything: options
    LM students do not support, no held-out split (the study's metric) and, with ``read``
    (once per study), a held-out split that cannot be read."""
    import os

    from kdcache.data.lmtext import iter_rows
    from kdcache.distill.lmsetup import _refuse_unsupported

    _refuse_unsupported(cfg)
    if not cfg.test_split or cfg.test_split == "none":
        raise KdcacheError(
            f"--set test_split={cfg.test_split!r}: a study on token caches reports the held-out "
            "perplexity; expected a held-out split or file"
        )
    if not read:
        return
    root, split = cfg.data_root, cfg.test_split
    if os.path.isfile(split):
        root, split = split, os.path.splitext(os.path.basename(split))[0]
    try:
        first = next(iter_rows(cfg.dataset, root, split, cfg.text_column), None)
    except KdcacheError as e:
        raise KdcacheError(
            f"held-out split of every run: {e} (a study on token caches needs --dataset text "
            "--data-root DIR with the held-out split, or --set test_split='\"FILE\"')"
        ) from None
    if first is None:
        raise KdcacheError(f"held-out split {cfg.test_split!r} of --dataset {cfg.dataset} is "
                           "empty; expected text rows")  # fmt: skip


def check_lm_study(spec, cfg: dict) -> None:
    """Once per LM study, before launching: the held-out split reads, the students share the
    caches' tokenizer. `cfg`: one planned run's config (they differ in loss and seed only)."""
    from kdcache.distill.config import DistillConfig

    check_lm_config(DistillConfig(**cfg), read=True)
    caches = [c for c in [spec.cache, *spec.loss_cache.values()] if c]
    check_students(spec.students, caches, spec.distill.get("storage_options") or None)


def check_students(students: list[str], caches: list[str], storage: dict | None) -> None:
    """Every student shares each token cache's tokenizer (checked from the students' config and
    tokenizer files, without loading their weights)."""
    import os

    from kdcache.cache.tokens import open_token_cache
    from kdcache.distill.lmsetup import tokenizer_mismatch
    from kdcache.models.lmstudent import _TOKENIZER_FILES
    from transformers import AutoConfig, AutoTokenizer

    for path in dict.fromkeys(caches):
        with open_token_cache(path, storage) as cache:
            tok = AutoTokenizer.from_pretrained(cache.tokenizer_dir())
            for student in students:
                d = os.path.expanduser(student[3:])
                own = None
                if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f))
                                            for f in _TOKENIZER_FILES):  # fmt: skip
                    own = AutoTokenizer.from_pretrained(d)
                vocab = int(AutoConfig.from_pretrained(d).vocab_size)
                bad = tokenizer_mismatch(student, own, vocab, cache, tok)
                if bad is not None:
                    raise KdcacheError(bad)
