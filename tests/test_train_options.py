"""`distill` run options end to end: in-epoch logs, TensorBoard, --eval-every, the recipe
knobs, the final line, the online teacher, --fill-missing, and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.clitools import cli
from tests.test_distill import TRAIN, N, _cache, _weights


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def test_logs_eval_every_recipe_and_summary(tmp_path):
    run = tmp_path / "run"
    res = cli(
        "distill",
        "--student",
        "resnet8",
        "--epochs",
        "3",
        "--out",
        run,
        *TRAIN,
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--tensorboard",
        "--ema",
        "--ema-decay",
        "0.5",
        "--warmup-epochs",
        "1",
        "--clip-grad",
        "5",
        "--label-smoothing",
        "0.1",
        "--accum-steps",
        "2",
    )
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    # evaluated on epoch 2 (every 2nd) and the last one only; EMA evaluated alongside
    assert ["test_acc" in r for r in recs] == [False, True, True]
    assert all(0 <= r["ema_test_acc"] <= 1 for r in recs[1:])
    # 48 samples / batch 16 = 3 batches, accum 2 -> 2 optimizer steps per epoch, a row each
    steps = _rows(run / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1, 2, 2]
    assert steps[0]["lr"] == pytest.approx(0.05 / 2)  # warmup over 2 steps: half at step 1
    # metrics.jsonl (and the lr panel) show the warm-up too: the mean of 1/2 and 1 of 0.05
    assert recs[0]["lr"] == pytest.approx(0.05 * 0.75) and recs[1]["lr"] < 0.05
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in steps)
    assert (run / "steps.csv").read_text().splitlines()[0].startswith("ce,")
    assert list((run / "tb").glob("events.out.tfevents.*"))
    best = torch.load(run / "best.pt", weights_only=True)
    assert "ema" in best and best["epoch"] == best["best_epoch"]
    last = res.output[res.output.rindex("done: ") :].strip()  # after the bars' stderr
    assert last.startswith("done: epoch 3") and f"best.pt: {run / 'best.pt'}" in last
    assert f"best {best['best_acc']:.4f} (epoch {best['epoch'] + 1})" in last  # from 1
    assert f"last test acc {recs[-1]['test_acc']:.4f}" in last and "ema acc" in last


def test_online_teacher_without_a_cache(tmp_path):
    run = tmp_path / "online"
    w = _weights(tmp_path)
    cli(
        "distill",
        "--student",
        "resnet8",
        "--loss",
        "wsl",
        "--teacher",
        "resnet8",
        "--teacher-weights",
        w,
        "--epochs",
        "1",
        "--out",
        run,
        *TRAIN,
    )
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["samples"] == N and 0 < rec["weight_mean"] < 1 and rec["teacher_train_acc"] >= 0


def _hole(cache_dir, name: str) -> str:
    """A cache whose chunk 1 was lost: zeroed logits, done flag cleared, not complete."""
    import zarr

    path = _cache(cache_dir, name)
    g = zarr.open_group(path, mode="r+")
    meta = dict(g.attrs["kdcache"])
    meta["complete"] = False
    meta.pop("checksums", None)
    g.attrs["kdcache"] = meta
    g["done"][1] = 0
    g["logits"][16:32] = 0
    return path


def test_fill_missing_completes_the_cache_then_trains(cache_dir, tmp_path):
    from kdcache.cache.store import open_cache

    full = _cache(cache_dir, "full.zarr")
    holed = _hole(cache_dir, "holed.zarr")
    w = str(cache_dir / "resnet8-0.pt")
    base = ["distill", "--student", "resnet8", "--loss", "kd", "--epochs", "1", *TRAIN]
    res = cli(*base, "--cache", holed, "--out", tmp_path / "no", ok=False)
    assert res.exit_code == 2 and "incomplete" in res.output
    other = _weights(tmp_path, seed=5)
    res = cli(
        *base, "--cache", holed, "--teacher", "resnet8", "--teacher-weights", other,
        "--fill-missing", "--out", tmp_path / "bad", ok=False,
    )  # fmt: skip
    assert res.exit_code == 2 and "sha256" in res.output.strip().splitlines()[-1]
    cli(
        *base, "--cache", holed, "--teacher", "resnet8", "--teacher-weights", w,
        "--fill-missing", "--out", tmp_path / "ok",
    )  # fmt: skip
    with open_cache(holed) as a, open_cache(full) as b:
        assert a.is_complete() and not a.missing_chunks()
        s = np.arange(N)
        for aug in range(3):
            np.testing.assert_array_equal(a.read(s, s * 0 + aug), b.read(s, s * 0 + aug))
        np.testing.assert_array_equal(a.view_params(), b.view_params())
    assert not (cache_dir / "holed.zarr.lock").exists()  # the writer lock was released
    rec = json.loads((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["samples"] == N


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--eval-every", "0"], "--eval-every 0"),
        (["--accum-steps", "0"], "--accum-steps 0"),
        (["--label-smoothing", "1.5"], "--label-smoothing 1.5"),
        (["--clip-grad", "0"], "--clip-grad 0"),
        (["--ema", "--ema-decay", "1"], "--ema-decay 1"),
        (["--teacher-weights", "w.pt"], "--teacher-weights needs --teacher"),
        (["--loss", "kd", "--cache", "C", "--teacher", "resnet8"], "--fill-missing"),
        (["--loss", "lsr", "--label-smoothing", "0.1"], "eps"),
    ],
)
def test_option_refusals(tmp_path, extra, expect):
    res = cli(
        "distill", "--student", "resnet8", "--epochs", "1", "--out", tmp_path / "r", *TRAIN,
        *extra, ok=False,
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and expect in last, res.output
    assert not (tmp_path / "r" / "last.pt").exists()


def test_resume_restores_ema_and_step_log(tmp_path):
    args = ["distill", "--student", "resnet8", *TRAIN, "--ema", "--log-every", "1"]
    cli(*args, "--epochs", "3", "--out", tmp_path / "straight")
    cli(*args, "--epochs", "3", "--max-steps", "6", "--out", tmp_path / "killed")
    log = tmp_path / "killed" / "steps.jsonl"
    assert [r["step"] for r in _rows(log)] == [1, 2, 3, 4, 5, 6]
    with log.open("a") as f:  # a row logged after the last checkpoint, then killed
        f.write(json.dumps({"epoch": 2, "step": 7, "loss": -1.0}) + "\n")
    cli(*args, "--epochs", "3", "--resume", "--out", tmp_path / "killed")
    a, b = (_rows(tmp_path / d / "steps.jsonl") for d in ("straight", "killed"))
    assert [r["step"] for r in b] == list(range(1, 10))  # step 7 was dropped and redone
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == y["loss"] and x["train_acc"] == y["train_acc"]
    ea, eb = (
        torch.load(tmp_path / d / "last.pt", weights_only=True)["ema"]
        for d in ("straight", "killed")
    )
    assert ea["updates"] == eb["updates"] == 9
    assert all(torch.equal(ea["module"][k], eb["module"][k]) for k in ea["module"])


def test_ddp_rank0_prints_the_summary_and_logs_global_rows(tmp_path):
    from tests.clitools import torchrun

    run = tmp_path / "ddp"
    p = torchrun(
        2, "distill", "--student", "resnet8", "--epochs", "1", "--out", run, *TRAIN,
        "--log-every", "1",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("done: ") == 1, p.stdout
    steps = _rows(run / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3]  # one row per step, written by rank 0
    assert all(0 <= r["train_acc"] <= 1 for r in steps)
