"""A distill run directory: refuse to clobber an old run, resume only what can be resumed,
and keep `last.pt`/`best.pt` a consistent pair whatever moment a run is killed.

`last.pt` is the commit point of an epoch: it is written (temp file + rename) after the
epoch's metrics, and `best.pt` is a copy of it made afterwards. A run killed between the two
leaves `best.pt` behind; the resumed run sees from `last.pt` (`best_epoch == epoch`) that
`best.pt` should be that very checkpoint and copies it again, so after any kill the pair
agrees. Metrics of epochs after `last.pt` are dropped on resume and redone.
"""

from __future__ import annotations

import filecmp
import logging
import os
import re
import shutil
import textwrap
from pathlib import Path

import torch
from kdcache.cache import leftovers, space
from kdcache.cache.errors import DiskFullError, KdcacheError

log = logging.getLogger(__name__)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
RUN_FILES = (LAST, BEST, METRICS, "metrics.csv", "loss.png", "accuracy.png", "wsl.png",
             "speed.png")  # fmt: skip
# what may differ between the run in last.pt and its --resume: where things are and how fast
# they run, never what is computed
RESUME_MAY_CHANGE = (
    "resume", "overwrite", "out", "device", "workers", "amp", "memory_budget_gb", "plots",
    "storage_options", "max_steps", "caches", "data_root", "download", "test_split",
    "pretrained", "weights", "compile", "log_every", "eval_every", "tensorboard",
    "fill_missing", "cli_options",
)  # fmt: skip


# config fields whose option has another name (`--cache` repeated fills `caches`)
_OPTION = {"caches": "--cache", "hparams": "--hparam"}


def _flag(name: str) -> str:
    return _OPTION.get(name, "--" + name.replace("_", "-"))


def prepare_out(cfg, is_main: bool = True, cache_keys: list[str] | None = None) -> dict | None:
    """Before anything is written to `cfg.out`: clean what a killed run left, refuse an
    existing run without --resume (--overwrite removes it), and return the checkpoint to
    resume from (None: start from scratch). `cache_keys`: the keys of the caches given now;
    a resume may find them at other paths, never with other contents."""
    out = Path(cfg.out)
    overwrite = bool(getattr(cfg, "overwrite", False))
    if cfg.resume and overwrite:
        raise KdcacheError("--resume and --overwrite exclude each other; give one")
    if out.exists() and not out.is_dir():
        raise KdcacheError(f"--out {str(out)!r} is a file; expected a run directory")
    if is_main:
        for name in (LAST, BEST):
            leftovers.dead_pid_temps(str(out / name))
    present = [n for n in RUN_FILES if (out / n).exists()]
    if not cfg.resume:
        if present and not overwrite:
            raise KdcacheError(
                f"--out {str(out)!r} already holds a run ({', '.join(present[:3])}); pass "
                "--resume to continue it or --overwrite to replace it"
            )
        if present and is_main:
            log.warning("--overwrite: removing the run in %s", out)
            for n in present:
                (out / n).unlink()
        return None
    if not (out / LAST).exists():
        if present and is_main:  # a run killed in its first epoch: nothing was committed
            log.warning("--resume: no %s yet; starting %s from scratch", out / LAST, out)
            for n in present:
                (out / n).unlink()
        return None
    ck = load_checkpoint(out / LAST)
    check_resumable(ck.get("config") or {}, cfg.to_dict(), out / LAST)
    old_keys = ck.get("cache_keys")
    if old_keys is not None and cache_keys is not None and list(old_keys) != list(cache_keys):
        raise KdcacheError(
            f"--resume: {out / LAST} was trained from caches with keys "
            f"{[k[:12] for k in old_keys]} but --cache now gives {[k[:12] for k in cache_keys]}; "
            "a resumed run must read the same teacher logits (other paths are fine)"
        )
    if is_main:
        reconcile_best(out, ck)
    return ck


def load_checkpoint(path: Path) -> dict:
    """A kdcache checkpoint (weights_only: never runs pickled code), or one error line."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        why = _why(e)
        raise KdcacheError(
            f"--resume: {path} is not a readable kdcache checkpoint ({why}); start over with "
            "--overwrite"
        ) from None
    need = ("model", "optimizer", "scheduler", "epoch", "step", "best_acc")
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        raise KdcacheError(
            f"--resume: {path} is not a kdcache checkpoint (expected the entries {list(need)}); "
            "start over with --overwrite"
        )
    return ck


def _why(e: Exception) -> str:
    """The reason torch gives, in whole words: the unpickler's own error when torch wraps it
    in its weights_only advice (whose "re-run with weights_only=False" kdcache never takes)."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    first = m.group(1) if m else (text.splitlines() or [""])[0]
    first = " ".join(first.split())
    if not first:
        return type(e).__name__ + (" (empty or truncated file)" if isinstance(e, EOFError) else "")
    return textwrap.shorten(first, 120, placeholder=" ...")


def check_resumable(old: dict, new: dict, path: Path) -> None:
    """Refuse a --resume whose settings change what is computed, naming every such field."""
    diff = [
        k for k in sorted(set(old) & set(new))
        if k not in RESUME_MAY_CHANGE and old[k] != new[k]
    ]  # fmt: skip
    if diff:
        parts = [f"{_flag(k)} {old[k]!r} -> {new[k]!r}" for k in diff]
        hidden = ("resume", "out", "cli_options")
        allowed = ", ".join(_flag(k) for k in RESUME_MAY_CHANGE if k not in hidden)
        raise KdcacheError(
            f"--resume: {path} was trained with other settings ({'; '.join(parts)}); rerun "
            f"with the old values or start over with --overwrite (only {allowed} may change "
            "on resume)"
        )


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def reconcile_best(out: Path, ck: dict) -> None:
    """Make best.pt the checkpoint last.pt says is best when a kill left it behind."""
    best_epoch = ck.get("best_epoch")
    if best_epoch is None or best_epoch != ck["epoch"]:
        return  # best.pt was completed before last.pt of a later epoch was started
    best = out / BEST
    if not best.exists() or not filecmp.cmp(out / LAST, best, shallow=False):
        log.warning("best.pt is older than last.pt's best epoch %d: copying last.pt", best_epoch)
        _copy_atomic(out / LAST, best)


def _state_bytes(state: dict) -> int:
    total = 0

    def walk(x) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    return total


def save_checkpoint(path: Path, state: dict, kept: str) -> None:
    """Temp file + rename: a killed run never leaves a torn checkpoint, a full disk gives one
    DiskFullError and leaves the previous checkpoint and no temp file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    need = _state_bytes(state)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        free = space.free_bytes(str(path))
        if isinstance(e, Exception) and (
            space.is_enospc(e) or (free is not None and free < need + space.MARGIN_BYTES)
        ):
            raise DiskFullError(
                f"no space left on the device of {path} while saving it; {kept}; free some "
                "space and rerun the same command with --resume"
            ) from None
        raise


def commit_epoch(out: Path, metrics, record: dict, state: dict, is_best: bool) -> None:
    """One finished epoch: metrics line, then last.pt (the commit), then best.pt (a copy).
    The space for all of it is checked first, so a full disk stops before the metrics."""
    epoch = state["epoch"]
    kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch else "no epoch was committed yet"
    space.require_space(str(out / LAST), _state_bytes(state) * (2 if is_best else 1), "a "
                        "checkpoint", kept + " (rerun with --resume)")  # fmt: skip
    metrics.append(record)
    save_checkpoint(out / LAST, state, kept)
    if is_best:
        try:
            _copy_atomic(out / LAST, out / BEST)
        except OSError as e:
            if space.is_enospc(e):
                raise DiskFullError(
                    f"no space left on the device of {out / BEST}; last.pt of epoch {epoch} is "
                    "saved and --resume rewrites best.pt from it"
                ) from None
            raise
