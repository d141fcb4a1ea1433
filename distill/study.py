"""`kdcache study`: many students from one cache — losses × seeds (× hparam grids × students).

A cache makes a student cheap (no teacher forward), so the honest way to compare methods is
many seeds per method, paired by seed, with a test that says whether a gap is beyond noise.
Every run is an ordinary `distill` run in its own process (`distill.study_worker`), with its
planned config in `OUT/runs/<student>/<variant>/seed<k>/run.json`; `result.json` is written
last, so a rerun of the same study skips finished runs and resumes a killed one from its
`last.pt`. The report (`distill.study_stats`) is rebuilt from the result files every time.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kdcache.cache.errors import KdcacheError
from tqdm import tqdm

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StudySpec:
    """What `kdcache study` trains and how it reports."""

    out: str
    losses: list[str]
    seeds: list[int]
    students: list[str] = field(default_factory=lambda: ["resnet8"])
    cache: str | None = None
    loss_cache: dict[str, str] = field(default_factory=dict)  # loss -> its own cache
    hparam_grid: dict[str, dict[str, list]] = field(default_factory=dict)  # loss|"*" -> grid
    baseline: str | None = None  # a variant label; default: the first variant of the first loss
    compare: list[tuple[str, str]] = field(default_factory=list)  # extra (a, b) pairs
    jobs: int = 0  # 0: one per core
    name: str = "study"
    distill: dict = field(default_factory=dict)  # DistillConfig fields shared by all runs
    task: str | None = None  # "classifier" | "lm" (token caches); set by plan()


@dataclass(frozen=True)
class PlannedRun:
    student: str
    variant: str  # loss, or loss[k=v,...] for a grid point
    loss: str
    hparams: dict
    seed: int
    dir: Path

    @property
    def result(self) -> Path:
        return self.dir / "result.json"


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5' or '0-4,10' -> sorted unique seeds."""
    seeds: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds.update(range(int(lo), int(hi) + 1))
            elif part:
                seeds.add(int(part))
    except ValueError:
        raise KdcacheError(f"--seeds {text!r}: expected e.g. 0-9 or 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise KdcacheError(f"--seeds {text!r}: expected non-negative seeds, e.g. 0-9 or 0,1,2")
    return sorted(seeds)


def parse_grid(items: list[str]) -> dict[str, dict[str, list]]:
    """`--hparam T=2,4` (every loss that has T) or `--hparam kd:T=2,4` (only kd) -> grids."""
    grid: dict[str, dict[str, list]] = {}
    for item in items:
        scope, _, rest = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        if "=" not in rest:
            raise KdcacheError(f"--hparam {item!r}: expected [LOSS:]NAME=V1,V2,...")
        key, values = rest.split("=", 1)
        parsed = []
        for v in values.split(","):
            try:
                parsed.append(json.loads(v))
            except json.JSONDecodeError:
                parsed.append(v)
        grid.setdefault(scope or "*", {})[key.strip().replace("-", "_")] = parsed
    return grid


def variant_label(loss: str, hp: dict) -> str:
    if not hp:
        return loss
    return loss + "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(hp.items())) + "]"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label).strip("_")


def _loss_info(spec: StudySpec, loss: str) -> tuple[dict, bool]:
    """(default hyper-parameters, needs teacher targets) from the study's loss registry."""
    from kdcache.distill.losses import loss_defaults, loss_needs_cache
    from kdcache.distill.study_lm import lm_loss_defaults

    if spec.task == "lm":
        return lm_loss_defaults(loss)
    try:
        return loss_defaults(loss), loss_needs_cache(loss)
    except ValueError as e:
        raise KdcacheError(f"--losses: {e}") from None


def _check_hparams(spec: StudySpec, loss: str, hp: dict) -> None:
    from kdcache.distill.losses import check_hparams
    from kdcache.distill.study_lm import check_lm_hparams

    if spec.task == "lm":
        check_lm_hparams(loss, hp)
        return
    try:
        check_hparams(loss, hp)
    except ValueError as e:
        raise KdcacheError(f"--hparam: {e}") from None


def _student_dir(student: str) -> str:
    """The student's folder name: a path (hf:./models/lm) flattened to one safe component."""
    return _slug(student) if "/" in student or "\\" in student else student


def plan(spec: StudySpec) -> list[PlannedRun]:
    """Every (student, loss variant, seed) run, with hyper-parameters checked up front."""
    from kdcache.distill.study_lm import study_task

    runs = []
    if not spec.losses:
        raise KdcacheError("--losses is empty; expected comma-separated losses, e.g. ce,kd")
    unknown = set(spec.hparam_grid) - {"*"} - set(spec.losses)
    if unknown:
        raise KdcacheError(f"--hparam names loss {sorted(unknown)[0]!r}, not in --losses")
    unknown = set(spec.loss_cache) - set(spec.losses)
    if unknown:
        raise KdcacheError(f"--loss-cache names loss {sorted(unknown)[0]!r}, not in --losses")
    if spec.task is None:
        spec.task = study_task(spec)
    for loss in spec.losses:
        defaults, needs_cache = _loss_info(spec, loss)
        online = bool(spec.distill.get("teacher")) and loss != "mrkd"  # --set teacher=NAME
        if spec.task == "lm" and needs_cache and not spec.loss_cache.get(loss, spec.cache):
            raise KdcacheError(f"--losses {loss} needs the teacher's targets: give --cache PATH "
                               f"(a token cache) or --loss-cache {loss}=PATH")  # fmt: skip
        if needs_cache and not spec.loss_cache.get(loss, spec.cache) and not online:
            raise KdcacheError(
                f"--losses {loss} needs teacher logits: give --cache PATH "
                "(or --set teacher='\"NAME\"' for online KD)"
            )
        grid = {k: v for k, v in spec.hparam_grid.get("*", {}).items() if k in defaults}
        grid.update(spec.hparam_grid.get(loss, {}))
        keys = sorted(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            hp = dict(zip(keys, combo, strict=True))
            _check_hparams(spec, loss, hp)
            label = variant_label(loss, hp)
            for student in spec.students:
                for seed in spec.seeds:
                    d = Path(spec.out) / "runs" / _student_dir(student) / _slug(label)
                    d = d / f"seed{seed}"
                    runs.append(PlannedRun(student, label, loss, hp, seed, d))
    return runs


def run_config(spec: StudySpec, r: PlannedRun) -> dict:
    """The DistillConfig fields of one run (what `run.json` holds). Hyper-parameters are
    stored resolved (the loss's defaults + the grid's values), so a run finished under an
    older default is refused on resume instead of being reported as if it had the new one."""
    from kdcache.distill.config import DistillConfig

    base = dict(spec.distill)
    base.update(
        student=r.student,
        loss=r.loss,
        hparams={**_loss_info(spec, r.loss)[0], **r.hparams},
        caches=[c] if (c := spec.loss_cache.get(r.loss, spec.cache)) else [],
        seed=r.seed,
        out=str(r.dir / "train"),
        resume=False,
        plots=False,
    )
    try:
        cfg = DistillConfig(**base)
    except TypeError as e:
        raise KdcacheError(f"--set: {e}") from None
    cfg.validate()  # a bad --lr / --schedule / --set is refused before any run is launched
    if spec.task == "lm":
        from kdcache.distill.study_lm import check_lm_config

        check_lm_config(cfg)
    return cfg.to_dict()


def _with_new_defaults(old: dict, cfg: dict) -> dict:
    """A stored run config plus the options added to DistillConfig since it was written,
    where this plan keeps their defaults (a finished study stays resumable across versions)."""
    from dataclasses import MISSING, fields

    from kdcache.distill.config import DistillConfig

    default = {f.name: f.default for f in fields(DistillConfig) if f.default is not MISSING}
    new = {k: v for k, v in cfg.items() if k not in old and k in default and v == default[k]}
    return {**new, **old}


def _pending(spec: StudySpec, runs: list[PlannedRun]) -> list[tuple[PlannedRun, dict]]:
    """Runs without a result; refuses a finished run whose stored config differs."""
    todo = []
    for r in runs:
        cfg = run_config(spec, r)
        stored = r.dir / "run.json"
        if stored.exists():
            old = _with_new_defaults(json.loads(stored.read_text()), cfg)
            if old != cfg:
                diff = sorted(k for k in set(old) | set(cfg)
                              if k not in old or k not in cfg or old[k] != cfg[k])  # fmt: skip
                raise KdcacheError(
                    f"{r.dir} was planned with other settings ({', '.join(diff)} differ); "
                    f"use another --out for a different study"
                )
            if r.result.exists():
                continue
        todo.append((r, cfg))
    return todo


def _launch(r: PlannedRun, cfg: dict, threads: int) -> tuple[PlannedRun, int]:
    """One run in its own process; output to OUT/.../log.txt."""
    r.dir.mkdir(parents=True, exist_ok=True)
    tmp = r.dir / "run.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=1, sort_keys=True))
    os.replace(tmp, r.dir / "run.json")
    train = r.dir / "train"
    if train.exists() and not (train / "last.pt").exists():
        shutil.rmtree(train)  # killed before its first checkpoint: start it over
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "kdcache.distill.study_worker", str(r.dir), str(threads)]
    with open(r.dir / "log.txt", "w") as logf:
        p = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
    return r, p.returncode


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_study(spec: StudySpec) -> dict:
    """Train what is missing (in parallel), then write the report; returns its summary."""
    from kdcache.distill.study_lm import CLS_METRIC, LM_METRIC
    from kdcache.distill.study_stats import load_results, write_report

    runs = plan(spec)
    variants = list(dict.fromkeys(r.variant for r in runs))
    baseline = spec.baseline or variants[0]  # the first variant of the first loss
    for opt, name in [
        ("--baseline", baseline),
        *(("--compare", v) for p in spec.compare for v in p),
    ]:
        if name not in variants:
            raise KdcacheError(
                f"{opt} {name!r} is not a variant of this study: {', '.join(variants)}"
            )
    if spec.jobs < 0:
        raise KdcacheError(f"--jobs {spec.jobs}: expected >= 0 (0: one per core)")
    if spec.task == "lm":
        from kdcache.distill.study_lm import check_lm_study

        check_lm_study(spec, run_config(spec, runs[0]))
    todo = _pending(spec, runs)
    jobs = min(spec.jobs or cores(), max(1, len(todo)))
    threads = max(1, cores() // jobs)
    log.info(
        "%d runs planned, %d to train, %d jobs x %d threads", len(runs), len(todo), jobs, threads
    )
    failed = []
    if todo:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_launch, r, cfg, threads) for r, cfg in todo]
            for f in tqdm(futures, desc="study", unit="run", dynamic_ncols=True):
                r, rc = f.result()
                if rc != 0 or not r.result.exists():
                    failed.append(r)
    rows = load_results(runs)
    metric = LM_METRIC if spec.task == "lm" else CLS_METRIC
    report = write_report(rows, Path(spec.out), spec.name, baseline, spec.compare, metric)
    report.update(planned=len(runs), trained=len(todo) - len(failed), failed=len(failed))
    if failed:
        raise KdcacheError(
            f"{len(failed)} of {len(todo)} runs failed (report written without them); "
            f"first: {failed[0].dir / 'log.txt'}"
        )
    return report
