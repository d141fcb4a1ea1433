"""Stage 1 end to end: real models on test-made data, replay, determinism, resume, torchrun."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from kdcache.cache.store import open_cache

from tests.clitools import ROOT, cli, cli_proc, proc_env, torchrun

DIGITS = ["--dataset", "digits", "--teacher", "resnet8", "--num-augs", "2"]


def _save_weights(tmp_path, name: str, num_classes: int) -> str:
    from kdcache.models.factory import create_model

    torch.manual_seed(0)
    model, _ = create_model(name, num_classes=num_classes)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def _arrays(path: str) -> dict:
    with open_cache(path) as c:
        return {
            "logits": np.concatenate([c.read_chunk_raw(k) for k in range(c.n_chunks)]),
            "view_params": c.view_params(),
            "labels": c.labels(),
            "keys": c.keys(),
            "checksums": c.attrs["checksums"],
            "key": c.key,
        }


def _same_bytes(a: str, b: str) -> None:
    x, y = _arrays(a), _arrays(b)
    for k in x:
        if isinstance(x[k], np.ndarray):
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


def test_resnet34_cache_is_the_teacher_on_the_replayed_views(tmp_path, make_cifar):
    """Real timm resnet34 on CIFAR pickles: cached logits == teacher(view(params))."""
    from kdcache.data.datasets import load_dataset
    from kdcache.data.views import get_policy
    from kdcache.models.factory import create_model

    root = make_cifar("cifar10", n_train=12, n_test=4)
    weights = _save_weights(tmp_path, "resnet34", 5)
    out = tmp_path / "r34.zarr"
    res = cli(
        "precompute",
        "--teacher",
        "resnet34",
        "--weights",
        weights,
        "--dataset",
        "cifar10",
        "--data-root",
        root,
        "--num-augs",
        "3",
        "--out",
        out,
        "--chunk-samples",
        "5",
        "--batch-size",
        "4",
    )
    assert "12 samples x 3 views x 5 classes" in res.stdout
    cache = open_cache(str(out))
    assert cache.is_complete() and (cache.n, cache.num_augs, cache.num_classes) == (12, 3, 5)
    assert cache.spec.teacher["source"] == "timm"
    assert len(cache.spec.teacher["weights_sha256"]) == 64
    ds = load_dataset("cifar10", root=root)
    assert cache.keys() == ds.keys and cache.keys()[3] == "cifar10/train/00003"
    params = cache.view_params()
    policy = get_policy("crop-flip", **cache.spec.views["params"])
    assert np.array_equal(params[:, 0], np.broadcast_to(policy.identity_params(), (12, 3)))
    assert len(np.unique(params[:, 1:].reshape(-1, 3), axis=0)) > 5  # really augmented
    model, _ = create_model("resnet34", weights=weights)
    model.eval()
    samples = np.repeat(np.arange(12), 3)
    augs = np.tile(np.arange(3), 12)
    views = policy.apply(ds.get(samples), torch.from_numpy(params[samples, augs]))
    with torch.no_grad():
        want = model(views).numpy()
    got = cache.read(samples, augs)
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=0, atol=2e-2)


def test_views_and_logits_do_not_depend_on_batch_size_or_workers(tmp_path):
    weights = _save_weights(tmp_path, "resnet8", 10)
    outs = []
    for i, (bs, workers) in enumerate([(7, 0), (200, 2)]):
        res = cli(
            "precompute",
            *DIGITS,
            "--weights",
            weights,
            "--max-samples",
            "60",
            "--chunk-samples",
            "16",
            "--batch-size",
            bs,
            "--workers",
            workers,
            "--out",
            tmp_path / f"root{i}",
        )
        outs.append(next(ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("cache")))
    # content-keyed names: the same spec gives the same relative name under any root
    assert os.path.relpath(outs[0], tmp_path / "root0") == os.path.relpath(
        outs[1], tmp_path / "root1"
    )
    assert outs[0].endswith(".zarr") and "/digits-train/resnet8-" in outs[0]
    a, b = _arrays(outs[0]), _arrays(outs[1])
    assert np.array_equal(a["view_params"], b["view_params"])
    np.testing.assert_allclose(
        a["logits"].astype(np.float32), b["logits"].astype(np.float32), atol=1e-2
    )


def test_different_seed_gives_a_different_key(tmp_path):
    weights = _save_weights(tmp_path, "resnet8", 10)
    names = []
    for seed in (0, 1, 0):
        res = cli(
            "precompute",
            *DIGITS,
            "--weights",
            weights,
            "--max-samples",
            "20",
            "--seed",
            seed,
            "--out",
            tmp_path / "root",
        )
        names.append(
            next(ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("cache"))
        )
    assert names[0] == names[2] and names[0] != names[1]


def _kill_midway(proc: subprocess.Popen, min_views: int, timeout: float = 180) -> None:
    """SIGKILL the writer once its progress bar shows `min_views` views computed.

    (An HDF5 file open for writing cannot be polled by another process, so watch stderr.)
    """
    buf, t0 = "", time.time()
    while time.time() - t0 < timeout:
        ch = proc.stderr.read(1)
        assert ch, "writer finished before it could be killed"
        buf = (buf + ch)[-200:]
        m = re.findall(r"(\d+)/(\d+) \[", buf)
        if m and min_views <= int(m[-1][0]) < int(m[-1][1]):
            os.kill(proc.pid, signal.SIGKILL)
            return
    raise AssertionError("no progress in time")


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, fmt):
    weights = _save_weights(tmp_path, "resnet20", 10)
    args = [
        "precompute",
        "--dataset",
        "digits",
        "--teacher",
        "resnet20",
        "--weights",
        weights,
        "--num-augs",
        "4",
        "--max-samples",
        "480",
        "--chunk-samples",
        "16",
        "--batch-size",
        "32",
    ]
    killed = str(tmp_path / f"killed.{fmt}")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args, "--out", killed],
        cwd=ROOT,
        env=proc_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _kill_midway(proc, min_views=3 * 16 * 4)
    finally:
        proc.kill()
        proc.wait()
    with open_cache(killed) as c:
        assert not c.is_complete() and 0 < c.done().sum() < c.n_chunks
    cli(*args, "--out", killed)  # the same command continues
    clean = str(tmp_path / f"clean.{fmt}")
    cli(*args, "--out", clean)
    _same_bytes(killed, clean)
    assert cli("cache", "verify", killed).exit_code == 0


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, fmt):
    weights = _save_weights(tmp_path, "resnet8", 10)
    args = [
        "precompute",
        *DIGITS,
        "--weights",
        weights,
        "--max-samples",
        "70",
        "--chunk-samples",
        "16",
        "--batch-size",
        "16",
    ]
    single, multi = str(tmp_path / f"one.{fmt}"), str(tmp_path / f"two.{fmt}")
    cli("precompute", *args[1:], "--out", single)
    p = torchrun(2, *args, "--out", multi)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("cache     ") == 1, p.stdout  # the summary once (rank 0)
    _same_bytes(single, multi)
    assert not list(tmp_path.glob("two.*rank*"))  # HDF5 shards were merged and removed


def test_verify_replay_proves_the_views(tmp_path):
    weights = _save_weights(tmp_path, "resnet8", 10)
    out = str(tmp_path / "c.zarr")
    cli("precompute", *DIGITS, "--weights", weights, "--max-samples", "40", "--out", out)
    assert "ok" in cli("cache", "verify", out, "--replay").output
    import zarr

    g = zarr.open_group(out, mode="r+")
    digest = open_cache(out).attrs["provenance"]["replay_digests"][0]
    vp = g["view_params"][digest["sample"]]
    vp[digest["aug"], 0] += 1
    g["view_params"][digest["sample"]] = vp
    res = cli("cache", "verify", out, "--replay", ok=False)
    assert res.exit_code == 1
    assert f"sample {digest['sample']} aug {digest['aug']}" in res.output


def test_imagefolder_torchvision_rrc_flip(tmp_path, make_imagefolder):
    root = make_imagefolder(n_per_class=3, classes=("cat", "dog"), size=(20, 16))
    out = tmp_path / "tv.h5"
    res = cli(
        "precompute",
        "--teacher",
        "tv:resnet18",
        "--random-init",
        "--dataset",
        "imagefolder",
        "--data-root",
        root,
        "--augment",
        "rrc-flip",
        "--image-size",
        "24",
        "--num-augs",
        "2",
        "--out",
        out,
    )
    assert "6 samples x 2 views x 2 classes" in res.output
    with open_cache(str(out)) as c:
        assert c.spec.teacher["source"] == "torchvision"
        assert c.spec.views["params"]["size"] in (24, [24, 24])
        assert c.keys()[0].endswith(".png") and c.view_params().shape == (6, 2, 5)


def test_text_teacher_with_token_mask(tmp_path, make_text_file, tiny_bert_dir):
    data = make_text_file("jsonl", n=12)
    out = tmp_path / "bert.zarr"
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
        "3",
        "--max-length",
        "16",
        "--out",
        out,
    )
    with open_cache(str(out)) as c:
        assert (c.n, c.num_augs, c.num_classes) == (12, 3, 3)
        assert c.spec.teacher["source"] == "hf"
        lg = c.read(np.arange(12).repeat(3), np.tile(np.arange(3), 12)).reshape(12, 3, 3)
        assert np.isfinite(lg).all() and not np.allclose(lg[:, 0], lg[:, 1])  # masking changes it
    assert "ok" in cli("cache", "verify", out, "--replay", "--data-root", data).output


def _nan_weights(tmp_path) -> str:
    from kdcache.models.factory import create_model

    model, _ = create_model("resnet8", num_classes=10)
    sd = model.state_dict()
    key = [k for k in sd if k.endswith("bias") and sd[k].shape == (10,)][0]
    sd[key][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize(
    "case", ["teacher", "dataset", "policy", "root", "classes", "nan", "unwritable", "spec"]
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case, make_cifar):
    out = tmp_path / "out.zarr"
    init = [] if case in ("classes", "nan") else ["--random-init"]  # those give --weights
    base = ["precompute", *DIGITS, *init, "--max-samples", "20", "--out", out]
    args, expect = {
        "teacher": (["--teacher", "nosuchnet"], "nosuchnet"),
        "dataset": (["--dataset", "mnist9"], "mnist9"),
        "policy": (["--augment", "wobble"], "wobble"),
        "root": (["--dataset", "cifar10", "--data-root", tmp_path / "missing"], "missing"),
        "classes": (
            ["--weights", _save_weights(tmp_path, "resnet8", 10), "--num-classes", "7"],
            "7",
        ),
        "nan": (["--weights", _nan_weights(tmp_path)], "NaN"),
        "unwritable": (["--out", "/proc/kdcache/x.zarr"], "/proc/kdcache/x.zarr"),
        "spec": (["--seed", "5"], "views.seed"),
    }[case]
    if case == "spec":
        cli(*base)
        before = _arrays(str(out))
    res = cli(*base, *args, ok=False)
    assert res.exit_code == 2, res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expect in last, res.output
    assert "Traceback" not in res.output
    if case == "spec":
        assert np.array_equal(_arrays(str(out))["logits"], before["logits"])
    else:
        assert not out.exists()


def test_cli_entry_point_runs_as_a_process(tmp_path):
    p = cli_proc("precompute", "--teacher", "nosuchnet", "--out", tmp_path / "x.zarr")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ")
    assert len(p.stderr.strip().splitlines()) == 1
