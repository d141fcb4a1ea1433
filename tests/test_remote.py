"""Remote caches on real loopback servers: S3 (moto server mode) and HTTP (http.server).

One moto server serves the whole module; every request is recorded, so the tests prove that
reading, verifying and training from a remote cache never writes to it.
"""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("moto.server")

from kdcache.cache.backends import backend_class, exists
from kdcache.cache.errors import KdcacheError
from kdcache.cache.store import create_cache, open_cache

from tests.clitools import cli
from tests.s3tools import FAKE_ENV, http_requests, start_http, start_moto
from tests.test_cache import KEYS, LABELS, LOGITS, VIEWS, make_spec, write
from tests.test_share import interrupted_copy

FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAKE_ENV.items():
            mp.setenv(k, v)
        rec, server = start_moto("team")
        mp.setenv("AWS_ENDPOINT_URL", rec.endpoint)  # how s3fs/botocore find the endpoint
        yield rec
        server.stop()


def err(res) -> str:
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in res.output, res.output
    return last


def same_bytes(a, b) -> bool:
    """Every array of two caches holds the same bytes (dense or sparse)."""
    from kdcache.cache.backends import layout, open_backend

    x, y = open_backend(str(a), False), open_backend(str(b), False)
    try:
        names = [n for n in layout(open_cache(str(a)).spec) if n != "keys"]
        return all(np.asarray(x.read(n)).tobytes() == np.asarray(y.read(n)).tobytes()
                   for n in names) and x.read("keys") == y.read("keys")  # fmt: skip
    finally:
        x.close()
        y.close()


def test_push_ls_pull_bit_identical_and_reads_never_write(s3, tmp_path, monkeypatch):
    src = write(tmp_path / "src.zarr", make_spec(compression="zstd"))
    url = "s3://team/alice/cifar/src.zarr"
    interrupted_copy(monkeypatch, src, url)
    info = json.loads(cli("cache", "info", url, "--json").output)
    assert (info["complete"], info["done_chunks"]) == (False, 2)  # never "complete" half-way
    res = cli("cache", "push", src, url, "--no-progress")
    assert "2 chunks copied, 2 already there" in res.output
    res = cli("cache", "ls", "s3://team/", "--json")
    (row,) = json.loads(res.output)
    assert row["path"] == url and row["complete"] and row["shape"] == [50, 3, 7]
    assert row["views"] == {"policy": "crop", "num_augs": 3, "seed": 0} and row["bytes"] > 0
    assert "toy/train" in cli("cache", "ls", "s3://team/alice").output
    n = len(s3.requests)
    assert cli("cache", "verify", url).output.startswith("ok")
    cli("cache", "info", url)
    open_cache(url).load()
    cli("cache", "pull", url, tmp_path / "back.zarr", "--no-progress")
    cli("cache", "pull", url, tmp_path / "back.h5", "--no-progress")
    assert s3.writes(n) == [] and len(s3.requests) > n
    assert same_bytes(src, tmp_path / "back.zarr") and same_bytes(src, tmp_path / "back.h5")
    # a different cache at the destination is refused; the lock names its owner
    other = write(tmp_path / "other.zarr", make_spec(dtype="float32"))
    assert "refusing to overwrite" in err(cli("cache", "push", other, url, ok=False))
    w = create_cache(url, make_spec(compression="zstd"), labels=LABELS, keys=KEYS)
    msg = err(cli("cache", "push", src, url, ok=False))
    assert f"pid {os.getpid()}" in msg and "s3://team/alice/cifar/src.zarr.lock" in msg
    assert "0 chunks copied" in cli("cache", "push", src, url, "--break-lock").output
    w.lock.held = False
    backend_class("zarr").delete(url)  # what precompute does with a cache it failed to fill
    assert not exists(url)


def test_precompute_to_s3_and_distill_from_s3(s3, tmp_path):
    from tests.test_distill import TRAIN, _weights

    url = "s3://team/runs/r8.zarr"
    cli("precompute", "--teacher", "resnet8", "--weights", _weights(tmp_path), "--dataset",
        "digits", "--max-samples", "32", "--num-augs", "2", "--chunk-samples", "16",
        "--out", url, "--topk", "3")  # fmt: skip
    with open_cache(url) as c:
        assert c.is_complete() and c.storage_kind == "topk" and c.read([0], [1]).shape == (1, 10)
    n = len(s3.requests)
    res = cli(
        "distill",
        "--student",
        "resnet8",
        "--loss",
        "kd",
        "--epochs",
        "1",
        "--cache",
        url,
        "--test-split",
        "none",
        "--out",
        tmp_path / "run",
        *TRAIN,
        "--max-samples",
        "32",
    )
    assert "done: epoch 1" in res.output
    assert s3.writes(n) == [] and len(s3.requests) > n  # training read it and wrote nothing


def test_remote_errors_are_one_line(s3, tmp_path):
    src = write(tmp_path / "src.zarr")
    bad_port = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, **FAST_FAIL}
    msg = err(cli("cache", "info", "s3://team/x.zarr", "--storage-options", json.dumps(bad_port),
                  ok=False))  # fmt: skip
    assert "cannot reach s3://team/x.zarr" in msg
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    try:  # moto now checks credentials: the fake ones are unknown
        creds = json.dumps({"key": "wrong", "secret": "wrong"})
        msg = err(cli("cache", "pull", "s3://team/any.zarr", tmp_path / "p.zarr",
                      "--storage-options", creds, ok=False))  # fmt: skip
        assert "access denied to s3://team/any.zarr" in msg and "credentials" in msg
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "p.partial.zarr").exists()
    assert "no cache at s3://team/nothing.zarr" in err(
        cli("cache", "verify", "s3://team/nothing.zarr", ok=False)
    )
    assert "nothing at s3://nobucket/" in err(cli("cache", "ls", "s3://nobucket/", ok=False))
    msg = err(cli("cache", "push", src, "s3://team/x.h5", ok=False))
    assert "HDF5 caches are written locally only" in msg
    with pytest.raises(KdcacheError, match="written locally only"):
        create_cache("s3://team/y.h5", make_spec(), labels=LABELS, keys=KEYS)
    assert not exists("s3://team/x.h5") and not exists("s3://team/y.h5")
    w = create_cache("s3://team/direct.zarr", make_spec(), labels=LABELS, keys=KEYS)
    w.write_chunk(0, LOGITS[:16], VIEWS[:16])
    w.close()
    res = cli("cache", "verify", "s3://team/direct.zarr", ok=False)
    assert res.exit_code == 1 and "incomplete: 3 of 4 chunks not done: [1, 2, 3]" in res.output
    with pytest.raises(KdcacheError, match="incomplete"):
        open_cache("s3://team/direct.zarr").load()


def test_http_read_only(tmp_path):
    root = tmp_path / "www"
    (root / "t").mkdir(parents=True)
    src = write(root / "t" / "a.zarr", make_spec(topk=3))
    write(root / "b.h5")
    rec, proc = start_http(str(root))
    try:
        url = rec.endpoint
        rows = json.loads(cli("cache", "ls", url + "/", "--json").output)
        assert sorted(r["path"] for r in rows) == [f"{url}/b.h5", f"{url}/t/a.zarr"]
        assert cli("cache", "verify", f"{url}/b.h5").output.startswith("ok")
        assert "top-3" in cli("cache", "info", f"{url}/t/a.zarr").output
        cli("cache", "pull", f"{url}/t/a.zarr", tmp_path / "a.zarr", "--no-progress")
        with open_cache(f"{url}/b.h5") as c:
            np.testing.assert_allclose(c.read([7], [2]), LOGITS[[7], [2]], rtol=1e-3)
        assert "read-only" in err(cli("cache", "push", src, f"{url}/c.zarr", ok=False))
        assert "no cache at" in err(cli("cache", "info", f"{url}/none.zarr", ok=False))
    finally:
        methods = {m for m, _ in http_requests(proc)}
    assert methods <= {"GET", "HEAD"} and "GET" in methods
    assert same_bytes(src, tmp_path / "a.zarr")
    shutil.rmtree(root)
