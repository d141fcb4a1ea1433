"""The README's commands as written (issue 17, item 4): a study grid with its default
baseline, `precompute --shard` + `cache merge`, options refused before anything runs, cache
folders made on pull/push, `verify --replay` finding the data, and the smaller promises."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error

import pytest
import zarr
from kdcache.cache.errors import KdcacheError
from kdcache.distill import study as study_mod
from kdcache.distill.config import DistillConfig

from tests.clitools import cli
from tests.test_distill import TRAIN, _cache
from tests.test_precompute import _same_bytes

RANDOM = ["--teacher", "resnet8", "--random-init", "--num-augs", "2", "--chunk-samples", "16"]


def _error(res, *parts: str) -> str:
    """The one `error:` line of a refused command (exit 2), containing every part."""
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


# -- study ----------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """study's runs, faked: the planned config is kept and a result written (no training)."""
    launched = []

    def fake_launch(r, cfg, threads):
        launched.append(cfg)
        r.dir.mkdir(parents=True, exist_ok=True)
        (r.dir / "run.json").write_text(json.dumps(cfg))
        acc = 0.8 + 0.1 * (cfg["hparams"]["T"] == 4) + r.seed / 100
        (r.dir / "result.json").write_text(json.dumps({"test_acc": acc}))
        return r, 0

    monkeypatch.setattr(study_mod, "_launch", fake_launch)
    return launched


def test_study_grid_default_baseline_is_the_first_variant(tmp_path, launches):
    out = tmp_path / "grid"
    res = cli("study", "--cache", tmp_path / "c.zarr", "--losses", "kd", "--seeds", "0-1",
              "--hparam", "kd:T=2,4", "--hparam", "alpha=0.5,0.9", "--out", out)  # fmt: skip
    assert len(launches) == 8 and {c["device"] for c in launches} == {"auto"}
    assert "paired by seed against `kd[T=2,alpha=0.5]`" in res.output
    assert "| resnet8 | kd[T=4,alpha=0.5] − kd[T=2,alpha=0.5] | 2 |" in res.output
    other = cli("study", "--cache", tmp_path / "c.zarr", "--losses", "kd", "--seeds", "0-1",
                "--hparam", "kd:T=2,4", "--hparam", "alpha=0.5,0.9", "--out", out,
                "--baseline", "kd[T=4,alpha=0.9]")  # fmt: skip
    assert "against `kd[T=4,alpha=0.9]`" in other.output and len(launches) == 8
    bad = cli("study", "--cache", tmp_path / "c.zarr", "--losses", "kd", "--hparam", "T=2,4",
              "--out", out, "--baseline", "kd", ok=False)  # fmt: skip
    _error(bad, "--baseline 'kd' is not a variant", "kd[T=2]")


@pytest.mark.parametrize(
    "extra, parts",
    [
        (["--lr", "-1"], ["'--lr'", "-1"]),
        (["--schedule", "foo"], ["'--schedule'", "foo"]),
        (["--epochs", "0"], ["'--epochs'"]),
        (["--set", "lr=-1"], ["--lr -1: expected a number in (0, inf)"]),
        (["--set", "gamma=0"], ["--gamma 0"]),
        (["--set", "workers=-2"], ["--workers -2"]),
    ],
)
def test_study_validates_training_options_before_launching(tmp_path, launches, extra, parts):
    res = cli("study", "--losses", "ce,lsr", "--seeds", "0", "--out", tmp_path / "st", *extra,
              ok=False)  # fmt: skip
    _error(res, *parts)
    assert launches == [] and not (tmp_path / "st").exists()


# -- distill refusals -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, parts",
    [
        (["--workers", "-1"], ["'--workers'", "-1"]),
        (["--memory-budget-gb", "-1"], ["'--memory-budget-gb'", "-1"]),
        (["--num-classes", "0"], ["'--num-classes'", "0"]),
        (["--gamma", "-1"], ["'--gamma'", "-1"]),
        (["--schedule", "foo"], ["'--schedule'", "foo"]),
    ],
)
def test_distill_refuses_out_of_range_options(tmp_path, extra, parts):
    res = cli("distill", "--student", "resnet8", "--epochs", "1", "--out", tmp_path / "r",
              *TRAIN, *extra, ok=False)  # fmt: skip
    _error(res, *parts)
    assert not (tmp_path / "r").exists()


def test_config_validate_covers_every_range():
    """The same ranges for config files, `study --set` and the Python API."""
    for field, bad in [("workers", -1), ("memory_budget_gb", -1.0), ("num_classes", 0),
                       ("gamma", -1.0), ("lr", float("nan")), ("momentum", 1.5),
                       ("optimizer", "sgdd"), ("milestones", [0, 5]), ("accum_steps", 0),
                       ("label_smoothing", 1.0), ("epochs", 2.5)]:  # fmt: skip
        with pytest.raises(KdcacheError, match="--" + field.replace("_", "-")):
            DistillConfig("resnet8", **{field: bad}).validate()
    DistillConfig("resnet8", num_classes=10, clip_grad=1.0).validate()


def test_distill_views_beyond_the_cache_fail_before_writing(tmp_path):
    cache = _cache(tmp_path)  # 3 cached views
    out = tmp_path / "r"
    res = cli("distill", "--student", "resnet8", "--loss", "kd", "--cache", cache, "--epochs",
              "1", "--views", "4", "--out", out, *TRAIN, ok=False)  # fmt: skip
    _error(res, "--views 4 needs >= 4 cached views; the cache has 3")
    assert not out.exists()  # no OUT/config.yaml left behind


# -- precompute --shard + cache merge -------------------------------------------------------
def test_precompute_shards_merge_into_the_whole_cache(tmp_path):
    args = ["precompute", *RANDOM, "--max-samples", "48"]  # 3 chunks of 16
    whole, a, b = (str(tmp_path / f"{n}.zarr") for n in ("whole", "alice", "bob"))
    cli(*args, "--out", whole)
    res = cli(*args, "--shard", "0/2", "--out", a)  # chunks 0 and 2
    assert "complete  False" in res.output and "shard     0/2: chunks c % 2 == 0" in res.output
    cli(*args, "--shard", "1/2", "--out", b)  # chunk 1
    info = {p: json.loads(cli("cache", "info", p, "--json").output) for p in (whole, a, b)}
    assert info[a]["key"] == info[b]["key"] == info[whole]["key"]  # shards share the key
    assert cli("cache", "verify", a, ok=False).exit_code == 1  # a partial cache
    assert "0 chunks to compute" not in cli(*args, "--shard", "0/2", "--out", a).output
    merged = str(tmp_path / "out.zarr")
    assert "one cache" in cli("cache", "merge", merged, a, b).output
    _same_bytes(merged, whole)
    again = str(tmp_path / "again.zarr")  # chunks done in both inputs, equal checksums: kept
    cli("cache", "merge", again, whole, a)
    _same_bytes(again, whole)
    g = zarr.open_group(a, mode="r+")  # alice's chunk 0 now has other bytes and checksum
    sums = g["checksums"][:]
    sums[0, 0] ^= 1
    g["checksums"][:] = sums
    res = cli("cache", "merge", str(tmp_path / "bad.zarr"), whole, a, ok=False)
    _error(res, "chunk 0 is done in both", "different checksums")
    assert not (tmp_path / "bad.zarr").exists()
    for shard, why in (("2/2", "0 <= I < N"), ("1-2", "I/N"), ("3/4", "has 3 chunks")):
        res = cli(*args, "--shard", shard, "--out", tmp_path / "x.zarr", ok=False)
        _error(res, "--shard", why)
    assert not list(tmp_path.glob("x.zarr*"))


def test_shard_chunks_deal_shards_then_ranks():
    from kdcache.precompute.run import shard_chunks

    todo = list(range(10))
    assert shard_chunks(todo, None, 1, 2) == [1, 3, 5, 7, 9]  # torchrun alone: c % W == R
    assert shard_chunks(todo, "1/3", 0, 1) == [1, 4, 7]
    ranks = [shard_chunks(todo, "1/3", r, 2) for r in range(2)]
    assert ranks == [[1, 7], [4]]  # the shard's chunks, dealt to the ranks in turn


# -- cache folders, verify --replay, verify exit code ---------------------------------------
@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_pull_push_make_folders_and_replay_finds_the_data(
    tmp_path, make_imagefolder, make_cifar, dataset
):
    root = make_imagefolder() if dataset == "imagefolder" else make_cifar(n_train=20, n_test=4)
    c = str(tmp_path / "c.zarr")
    cli("precompute", *RANDOM, "--dataset", dataset, "--data-root", root, "--out", c)
    assert cli("cache", "verify", c, "--replay").output.startswith("ok: ")  # root: provenance
    pulled = tmp_path / "local" / "deeper" / "r34.h5"
    assert "complete" in cli("cache", "pull", c, pulled, "--no-progress").output
    pushed = tmp_path / "team" / "cifar" / "r34.zarr"
    cli("cache", "push", pulled, pushed, "--no-progress")
    _same_bytes(str(pushed), c)


def test_verify_exits_1_on_edited_attrs(tmp_path):
    c = str(tmp_path / "c.zarr")
    cli("precompute", *RANDOM, "--max-samples", "16", "--out", c)
    g = zarr.open_group(c, mode="r+")
    g.attrs["kdcache"] = {**g.attrs["kdcache"], "complete": "no"}
    res = cli("cache", "verify", c, ok=False)
    assert res.exit_code == 1 and "problem: " in res.output and "'complete' is 'no'" in res.output
    _error(cli("cache", "info", c, ok=False), "'complete' is 'no'")  # other commands refuse


# -- distill resume, final line, evaluate ---------------------------------------------------
def test_resume_messages_and_evaluate_split(tmp_path, make_imagefolder):
    root = tmp_path / "folder"  # train/ and val/ splits, no test/
    shutil.copytree(make_imagefolder() / "train", root / "train")
    shutil.copytree(root / "train", root / "val")
    out = tmp_path / "r"
    args = ["distill", "--student", "resnet8", "--loss", "lsr", "--epochs", "1", "--dataset",
            "imagefolder", "--data-root", root, "--test-split", "val", "--batch-size", "4",
            "--no-plots", "--out", out]  # fmt: skip
    cli(*args, "--hparam", "eps=0.1")
    res = cli(*args, "--hparam", "eps=0.1", "--resume")
    assert "already finished (nothing to resume): epoch 1 " in res.output
    line = _error(cli(*args, "--hparam", "eps=0.2", "--resume", ok=False), "--hparam {'eps'")
    assert "--hparams" not in line and "--caches" not in line and "--cache," in line
    ev = json.loads(cli("evaluate", "--weights", out / "best.pt", "--json").output)
    assert ev["split"] == "val" and "split" in ev["from_checkpoint"]  # the run's --test-split
    assert ev["n"] == 6
    ev = cli("evaluate", "--weights", out / "best.pt", "--split", "train", "--json").output
    assert json.loads(ev)["split"] == "train"  # a flag overrides
    (out / "last.pt").write_bytes(b"garbage that is not a checkpoint")
    line = _error(cli(*args, "--hparam", "eps=0.1", "--resume", ok=False), "last.pt")
    assert line.endswith("; start over with --overwrite") and "(Unsupported operand" in line


# -- --pretrained offline -------------------------------------------------------------------
def test_pretrained_offline_prints_only_the_error_line(tmp_path, monkeypatch):
    import torch.hub

    def offline(url, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    hub = str(tmp_path / "hub")  # nothing cached there (whatever set_dir other tests called)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: hub)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    res = cli("precompute", "--teacher", "tv:resnet18", "--pretrained", "--max-samples", "4",
              "--out", tmp_path / "p.zarr", ok=False)  # fmt: skip
    _error(res, "cannot load pretrained weights for 'tv:resnet18'", "URLError")
    assert "Downloading" not in res.output and not (tmp_path / "p.zarr").exists()


def test_held_download_line_is_written_once_the_download_runs(capsys):
    from kdcache.models.factory import _hub_call

    def download():
        sys.stdout.write('Downloading: "https://x/w.pth" to /tmp/w.pth\n')
        assert capsys.readouterr().out == ""  # held: not connected yet
        sys.stderr.write("100%|##########| 1.00k/1.00k\n")
        assert capsys.readouterr().out.startswith("Downloading: ")  # written with the progress
        return "net"

    assert _hub_call("tv:x", download) == "net"
