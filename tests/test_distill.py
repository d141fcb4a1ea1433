"""Stage 2 end to end: training from the cache, proof that caching only changes speed,
resume, ensembles, chunk-aware reads, DDP, and refusals of mismatched caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.clitools import cli, torchrun

N = 48  # digits samples used by these tests (fast on 2 CPU cores)
TRAIN = [
    "--dataset",
    "digits",
    "--max-samples",
    str(N),
    "--batch-size",
    "16",
    "--lr",
    "0.05",
    "--schedule",
    "cosine",
    "--no-plots",
]


def _weights(tmp_path, name="resnet8", seed=0) -> str:
    from kdcache.models.factory import create_model

    torch.manual_seed(seed)
    model, _ = create_model(name, num_classes=10)
    path = tmp_path / f"{name}-{seed}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def _cache(tmp_path, name="c.zarr", seed=0, weight_seed=0, n=N, extra=()) -> str:
    out = str(tmp_path / name)
    cli(
        "precompute",
        "--teacher",
        "resnet8",
        "--weights",
        _weights(tmp_path, seed=weight_seed),
        "--dataset",
        "digits",
        "--max-samples",
        n,
        "--num-augs",
        "3",
        "--seed",
        seed,
        "--chunk-samples",
        "16",
        "--out",
        out,
        *extra,
    )
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


@pytest.fixture(scope="module")
def cache(cache_dir):
    return _cache(cache_dir)


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_caching_changes_nothing_but_speed(cache, tmp_path):
    """Same student, same seeds: the cached teacher and a live teacher on the replayed views
    give the same losses step by step (within float16 storage tolerance)."""
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.loop import BatchMaker, epoch_batches, train_epoch
    from kdcache.distill.setup import build_run, make_optimizer
    from kdcache.distill.teachers import OnlineTeacher
    from kdcache.models.factory import create_model
    from kdcache.models.runtime import init_runtime

    rt = init_runtime("cpu")
    cfg = DistillConfig(
        student="resnet8",
        loss="wsl",
        caches=[cache],
        dataset="digits",
        max_samples=N,
        batch_size=16,
        test_split="none",
    )
    teacher_model, _ = create_model("resnet8", weights=str(Path(cache).parent / "resnet8-0.pt"))
    histories = []
    for live in (False, True):
        torch.manual_seed(0)
        r = build_run(cfg, rt)
        make = BatchMaker(r.train, r.policy, r.teacher, seed=0)
        hist: list = []
        opt = make_optimizer(cfg, r.model)
        for epoch in range(2):
            batches = epoch_batches(make, N, 16, 0, epoch, "one", depth=0)
            online = OnlineTeacher(teacher_model, torch.device("cpu")) if live else None
            train_epoch(
                r.model,
                r.model,
                batches,
                r.loss_fn,
                opt,
                torch.device("cpu"),
                teacher=online,
                history=hist,
            )
        histories.append(hist)
    cached, live = histories
    assert len(cached) == len(live) == 6
    for a, b in zip(cached, live, strict=True):
        for k in ("loss", "ce", "soft", "weight_mean"):
            assert a[k] == pytest.approx(b[k], rel=2e-3, abs=2e-3), (k, a, b)


def test_distill_wsl_from_cache_writes_metrics_checkpoints_plots(cache, tmp_path):
    run = tmp_path / "run"
    res = cli(
        "distill",
        "--student",
        "resnet8",
        "--loss",
        "wsl",
        "--cache",
        cache,
        "--epochs",
        "2",
        "--out",
        run,
        *[a for a in TRAIN if a != "--no-plots"],
    )
    assert "done: epoch 2" in res.output  # counted from 1
    recs = _records(run)
    assert [r["epoch"] for r in recs] == [0, 1]
    for r in recs:
        assert 0 < r["weight_mean"] < 1 and 0 <= r["reg_fraction"] <= 1
        assert r["samples"] == N and r["samples_per_s"] > 0 and 0 <= r["test_acc"] <= 1
        assert r["loss"] == pytest.approx(r["ce"] + 2.25 * r["soft"], rel=1e-4)
    assert (run / "metrics.csv").read_text().splitlines()[0].count(",") > 8
    assert {p.name for p in run.glob("*.png")} >= {"loss.png", "accuracy.png", "wsl.png"}
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["config"]["loss"] == "wsl" and ck["config"]["caches"] == [cache]
    assert ck["epoch"] == 1
    best = torch.load(run / "best.pt", weights_only=True)
    ev = cli("evaluate", "--model", "resnet8", "--weights", run / "best.pt", "--dataset", "digits")
    assert f"top-1 {best['record']['test_acc']:.4f}" in ev.output
    ev32 = cli(
        "evaluate",
        "--model",
        "resnet8",
        "--weights",
        run / "best.pt",
        "--dataset",
        "digits",
        "--image-size",
        "32",
    )
    assert f"top-1 {best['record']['test_acc']:.4f}" in ev32.output  # digits are 32x32 already


@pytest.mark.parametrize("loss", ["ce", "mrkd", "lsr", "tfkd-reg", "lsr-os-tc"])
def test_plain_training_without_cache(tmp_path, loss):
    run = tmp_path / loss
    extra = ["--hparam", "interval=2"] if loss == "mrkd" else []
    cli(
        "distill",
        "--student",
        "resnet8",
        "--loss",
        loss,
        "--epochs",
        "1",
        "--out",
        run,
        *TRAIN,
        *extra,
    )
    rec = _records(run)[-1]
    assert rec["samples"] == N and np.isfinite(rec["loss"])
    if loss == "mrkd":
        assert rec["teacher_train_acc"] >= 0  # the historical copies acted as teacher


def test_resume_continues_bit_identically(cache, tmp_path):
    args = ["distill", "--student", "resnet8", "--loss", "kd", "--cache", cache, *TRAIN]
    cli(*args, "--epochs", "3", "--out", tmp_path / "straight")
    cli(*args, "--epochs", "3", "--max-steps", "6", "--out", tmp_path / "killed")
    assert [r["epoch"] for r in _records(tmp_path / "killed")] == [0, 1]
    cli(*args, "--epochs", "3", "--resume", "--out", tmp_path / "killed")
    assert [r["epoch"] for r in _records(tmp_path / "killed")] == [0, 1, 2]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ensemble_teacher_view_mean_and_views_all(cache, cache_dir):
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.setup import build_run
    from kdcache.models.runtime import init_runtime

    other = _cache(cache_dir, "other.zarr", weight_seed=1)
    rt = init_runtime("cpu")
    cfg = DistillConfig(
        student="resnet8", loss="kd", caches=[cache, other], max_samples=N, test_split="none"
    )
    r = build_run(cfg, rt)
    s, a = np.arange(5), np.array([0, 1, 2, 0, 1])
    c0, c1 = r.teacher.caches
    want = (c0.read(s, a) + c1.read(s, a)) / 2
    np.testing.assert_allclose(r.teacher.logits(s, a).numpy(), want, rtol=1e-6)
    cfg.teacher_view, cfg.caches = "mean", [cache]
    r = build_run(cfg, rt)
    full = np.stack([c0.read(s, np.full(5, j)) for j in range(3)]).mean(0)
    np.testing.assert_allclose(r.teacher.logits(s, a).numpy(), full, rtol=1e-6)


def test_views_all_and_chunk_aware_reads(cache, tmp_path):
    args = [
        "distill",
        "--student",
        "resnet8",
        "--loss",
        "kd",
        "--cache",
        cache,
        "--epochs",
        "1",
        *TRAIN,
    ]
    cli(*args, "--views", "all", "--out", tmp_path / "all")
    assert _records(tmp_path / "all")[-1]["samples"] == N * 3
    cli(*args, "--memory-budget-gb", "0.0000001", "--out", tmp_path / "chunked")
    rec = _records(tmp_path / "chunked")[-1]
    assert rec["samples"] == N and rec["teacher_train_acc"] >= 0


def test_ddp_two_ranks(cache, tmp_path):
    run = tmp_path / "ddp"
    p = torchrun(
        2,
        "distill",
        "--student",
        "resnet8",
        "--loss",
        "wsl",
        "--cache",
        cache,
        "--epochs",
        "1",
        "--out",
        run,
        *TRAIN,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rec = _records(run)[-1]
    assert rec["samples"] == N and 0 < rec["weight_mean"] < 1


@pytest.mark.parametrize(
    "case", ["n", "classes", "incomplete", "views", "loss", "hparam", "needs-cache", "dataset"]
)
def test_refusals(cache, cache_dir, tmp_path, case):
    base = ["distill", "--student", "resnet8", "--epochs", "1", "--out", tmp_path / "r", *TRAIN]
    extra, expect = {
        "n": (["--cache", cache, "--max-samples", "40"], "N=48"),
        "classes": (["--cache", cache, "--num-classes", "7"], "10 classes"),
        "incomplete": (["--cache", _incomplete(cache_dir)], "incomplete"),
        "views": (
            ["--cache", cache, "--cache", _cache(cache_dir, "seed9.zarr", seed=9)],
            "views.seed",
        ),
        "loss": (["--loss", "kdd"], "kdd"),
        "hparam": (["--loss", "kd", "--cache", cache, "--hparam", "beta=1"], "beta"),
        "needs-cache": (["--loss", "wsl"], "--cache"),
        "dataset": (
            ["--cache", _cache(cache_dir, "n40.zarr", n=40), "--max-samples", "48"],
            "N=40",
        ),
    }[case]
    args = base + ["--loss", "kd"] + extra if "--loss" not in extra else base + extra
    res = cli(*args, ok=False)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and expect in last, res.output
    assert not (tmp_path / "r" / "last.pt").exists()


def _incomplete(cache_dir) -> str:
    import zarr

    path = _cache(cache_dir, "inc.zarr", seed=3)
    g = zarr.open_group(path, mode="r+")
    meta = dict(g.attrs["kdcache"])
    meta["complete"] = False
    g.attrs["kdcache"] = meta
    g["done"][1] = 0
    return path


def test_text_student_from_text_cache(tmp_path, make_text_file, tiny_bert_dir):
    data = make_text_file("jsonl", n=12)
    cache = tmp_path / "t.zarr"
    cli(
        "precompute",
        "--teacher",
        f"hf:{tiny_bert_dir}",
        "--dataset",
        "text",
        "--data-root",
        data,
        "--augment",
        "token-mask",
        "--num-augs",
        "2",
        "--max-length",
        "16",
        "--out",
        cache,
    )
    run = tmp_path / "run"
    cli(
        "distill",
        "--student",
        f"hf:{tiny_bert_dir}",
        "--loss",
        "kd",
        "--cache",
        cache,
        "--dataset",
        "text",
        "--data-root",
        data,
        "--test-split",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--no-plots",
        "--out",
        run,
    )
    rec = _records(run)[-1]
    assert rec["samples"] == 12 and np.isfinite(rec["kd"])
