"""Resolve a distill config: data, student, view policy, teacher source, loss, optimizer."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.distill.config import DistillConfig

log = logging.getLogger(__name__)


@dataclass
class Run:
    model: torch.nn.Module
    info: dict
    modality: str
    train: object
    test: object | None
    policy: object
    teacher: object | None  # CachedTeacher (views + logits from the cache)
    live_teacher: object | None  # a teacher that runs on the views (online KD, MrKD)
    mrkd: object | None
    loss_fn: object
    reg_fn: object | None


def _loss(cfg: DistillConfig):
    from kdcache.distill.losses import get_loss, loss_defaults, loss_needs_teacher

    hp = dict(cfg.hparams)
    try:
        fn = get_loss(cfg.loss, **hp)
        needs = loss_needs_teacher(cfg.loss)
        defaults = loss_defaults(cfg.loss)
    except ValueError as e:
        raise KdcacheError(str(e)) from None
    return fn, needs, {**defaults, **hp}


def _check_hparams(cfg: DistillConfig, num_classes: int) -> None:
    """Domains that need K (lsr-os-tc: c > 1/K), before any file is written."""
    from kdcache.distill.losses import check_hparams

    try:
        check_hparams(cfg.loss, dict(cfg.hparams), num_classes)
    except ValueError as e:
        raise KdcacheError(str(e)) from None


def _tokenize(ds, info: dict, max_length: int | None = None):
    """A text source is batched with its tokenizer: dynamic padding, truncation at the
    cache's (or the model's) max_length. Returns the tokenizer."""
    from kdcache.data.text import TextCollate
    from kdcache.models.factory import load_tokenizer

    tok = load_tokenizer(info)
    ds.collate = TextCollate(tok, max_length or info["preprocessing"]["max_length"])
    return tok


def _policy(cfg: DistillConfig, cache, info: dict, dataset, tok=None):
    """The cache's view policy (replayed), or --augment (+ the strong options: fresh seeded
    views each epoch, Mixup/CutMix partners included) when training without a cache."""
    from kdcache.data.loader import make_policy
    from kdcache.data.views import get_policy

    if cache is not None:  # the stored params rebuild the very policy the teacher saw
        given = cfg.strong_given()
        if given:
            raise KdcacheError(
                f"{given[0]} with --cache: a cache replays the augmentation its teacher saw "
                "(cache info shows it); drop the option, or train without --cache"
            )
        name, kw = cache.spec.views["policy"], dict(cache.spec.views.get("params") or {})
        return get_policy(name, **kw)
    name = cfg.augment
    if dataset.modality == "text" and name not in ("identity", "token-mask"):
        name = "identity"
    return make_policy(
        name, dataset, info, cfg.image_size, tokenizer=tok, strong=cfg.strong(), cached=False
    )


def build_run(cfg: DistillConfig, rt) -> Run:
    """Everything is validated here, before a single step or file write."""
    from kdcache.data.datasets import load_dataset
    from kdcache.distill.recipe import ce_weight, reg_count, with_label_smoothing
    from kdcache.distill.teachers import CachedTeacher, MrKDTeacher, open_caches
    from kdcache.models.factory import create_model

    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise KdcacheError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    if cfg.batch_size < rt.world_size:
        raise KdcacheError(
            f"--batch-size {cfg.batch_size} is smaller than the world size "
            f"{rt.world_size}; it is the global batch"
        )
    from kdcache.distill.loop import views_per_sample

    k = views_per_sample(cfg.views)  # validated before anything runs
    loss_fn, needs_teacher, hp = _loss(cfg)
    if needs_teacher and not cfg.caches and cfg.loss != "mrkd" and not cfg.teacher:
        raise KdcacheError(
            f"--loss {cfg.loss} needs teacher logits: give --cache PATH or --teacher NAME"
        )
    _check_teacher_options(cfg)
    ls_weight = ce_weight(cfg.loss, hp) if cfg.label_smoothing else 0.0  # refused early
    columns = {
        "image_column": cfg.image_column,
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "storage_options": cfg.storage_options or None,
    }
    train = load_dataset(
        cfg.dataset,
        root=cfg.data_root,
        split=cfg.split,
        download=cfg.download,
        max_samples=cfg.max_samples,
        **columns,
    )
    test = None
    if cfg.test_split and cfg.test_split != "none":
        try:
            test = load_dataset(
                cfg.dataset,
                root=cfg.data_root,
                split=cfg.test_split,
                download=cfg.download,
                **columns,
            )
        except KdcacheError as e:
            if "no split" not in str(e):
                raise
            raise KdcacheError(f"{e} (--test-split SPLIT, or none to skip evaluation)") from None
    num_classes = cfg.num_classes or train.num_classes
    _check_hparams(cfg, num_classes)
    model, info = create_model(
        cfg.student, num_classes=num_classes, pretrained=cfg.pretrained, weights=cfg.weights
    )
    modality = info.get("modality", "image")
    if modality != train.modality:
        raise KdcacheError(
            f"student {cfg.student!r} takes {modality} but dataset "
            f"{cfg.dataset!r} is {train.modality}"
        )
    teacher = online = None
    if cfg.teacher:
        from kdcache.distill.teachers import OnlineTeacher

        online = OnlineTeacher.create(
            cfg.teacher, cfg.teacher_weights, num_classes, rt.device, cfg.amp, cfg.compile
        )
    if cfg.fill_missing:
        from kdcache.distill.fill import fill_missing_rank0

        fill_missing_rank0(rt, cfg.caches[0], cfg.storage_options, train, num_classes, online, 256)
        online = None  # the cache is complete now: train from it
    elif online is not None and not needs_teacher:
        log.warning("--loss %s uses no teacher logits; --teacher is not run", cfg.loss)
        online = None
    if cfg.caches:
        caches = open_caches(cfg.caches, train, num_classes, cfg.storage_options)
        teacher = CachedTeacher(
            caches, cfg.teacher_view, cfg.ensemble, int(cfg.memory_budget_gb * (1 << 30))
        )
    if teacher is not None and k > teacher.num_augs:
        raise KdcacheError(
            f"--views {k} needs >= {k} cached views; the cache has {teacher.num_augs} "
            "(use --views one, all, or K <= its views)"
        )
    cache0 = teacher.caches[0] if teacher is not None else None
    tok = None
    if modality == "text":
        tok_info = {"modality": "text", **cache0.spec.teacher} if cache0 is not None else info
        if cache0 is not None:  # the tokenizer stored in the cache, not the teacher's path
            from kdcache.models.factory import check_vocab, load_tokenizer

            tok_info["tokenizer_files"] = cache0.tokenizer_files()
            check_vocab(info, load_tokenizer(tok_info), cache0.spec.teacher.get("name"))
        for ds in (train, test):
            if ds is not None:
                tok = _tokenize(ds, tok_info)
    policy = _policy(cfg, cache0, info, train, tok)
    _check_mixed_labels(cfg, policy)
    mrkd, live = None, online
    if cfg.loss == "mrkd":
        mrkd = live = MrKDTeacher(
            int(hp["M"]), hp["interval"], warmup=int(hp["warmup"]), adjust=bool(hp["ka"]),
            labels=_row_labels(train, teacher),
        )  # fmt: skip
        if teacher is not None:  # the cache still gives the views, as for every other loss
            log.info("--loss mrkd: the cache gives the views; the teacher is the student's history")
    elif not needs_teacher and teacher is not None:
        log.info("--loss %s uses no teacher logits; the cache provides the views", cfg.loss)
    reg_fn = None
    if needs_teacher:
        reg_fn = functools.partial(reg_count, T=float(hp.get("T", 1.0)))
    if not needs_teacher:
        loss_fn = _ignore_teacher(loss_fn)
    elif cfg.loss == "mrkd":
        loss_fn = _fallback_ce(loss_fn)
    if cfg.label_smoothing:
        loss_fn = with_label_smoothing(loss_fn, cfg.label_smoothing, ls_weight)
    return Run(model, info, modality, train, test, policy, teacher, live, mrkd, loss_fn, reg_fn)


def _check_mixed_labels(cfg: DistillConfig, policy) -> None:
    """Mixup/CutMix views train against λ-mixed labels: only losses whose labels enter
    through CE take them."""
    from kdcache.distill.losses import MIXED_LABEL_LOSSES, loss_takes_mixed_labels

    if getattr(policy, "mixes", False) and not loss_takes_mixed_labels(cfg.loss):
        raise KdcacheError(
            f"--loss {cfg.loss} needs one integer label per view, but the cache's views are "
            f"mixed (Mixup/CutMix); expected one of {', '.join(MIXED_LABEL_LOSSES)}"
        )


def _check_teacher_options(cfg: DistillConfig) -> None:
    """--teacher alone: online KD; with --cache only together with --fill-missing."""
    if cfg.teacher_weights and not cfg.teacher:
        raise KdcacheError("--teacher-weights needs --teacher NAME")
    if cfg.fill_missing and not (cfg.teacher and len(cfg.caches) == 1):
        raise KdcacheError("--fill-missing needs one --cache PATH and the --teacher that made it")
    if cfg.teacher and cfg.caches and not cfg.fill_missing:
        raise KdcacheError(
            "--teacher with --cache: add --fill-missing to complete the cache with that teacher, "
            "or drop one of them (cached or online KD)"
        )
    if cfg.teacher and cfg.loss == "mrkd":
        raise KdcacheError("--loss mrkd distills from the student's own history; drop --teacher")


def _row_labels(train, teacher) -> np.ndarray:
    """Labels indexed like the loop's rows: a cache may store its rows permuted."""
    labels = np.asarray(train.labels, dtype=np.int64)
    rows = getattr(teacher, "rows", None)
    return labels if rows is None else labels[np.asarray(rows, dtype=np.int64)]


def _ignore_teacher(fn):
    return lambda s, t, y: fn(s, None, y)


def _fallback_ce(fn):
    """MrKD before its first snapshot has no teacher: plain CE."""
    from kdcache.distill.losses import get_loss

    ce = get_loss("ce")
    return lambda s, t, y: ce(s, None, y) if t is None else fn(s, t, y)


def make_optimizer(cfg: DistillConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=False,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise KdcacheError(f"unknown --optimizer {cfg.optimizer!r}; expected sgd or adamw")


def make_scheduler(cfg: DistillConfig, opt: torch.optim.Optimizer):
    """Per-epoch schedule: the CRD/WSL step recipe, cosine, or constant."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    raise KdcacheError(f"unknown --schedule {cfg.schedule!r}; expected step, cosine, constant")
