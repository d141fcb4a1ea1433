"""Sharing caches locally: push/pull (resume, repair, refusals), merge of shards and of
teachers, convert round trips, locks, and stage 2 reading sparse and multi-teacher caches."""

import os

import h5py
import numpy as np
import pytest
import zarr
from kdcache.cache import lock as lockmod
from kdcache.cache.errors import CacheCorruptError, KdcacheError
from kdcache.cache.share import copy_cache
from kdcache.cache.spec import dataset_fingerprint
from kdcache.cache.store import create_cache, open_cache, open_members
from kdcache.cache.verify import verify

from tests.clitools import cli
from tests.test_cache import KEYS, LABELS, LOGITS, VIEWS, make_spec, raw_arrays, respec, write


def same_bytes(a, b) -> bool:
    x, y = raw_arrays(a), raw_arrays(b)
    return all(x[k].tobytes() == y[k].tobytes() for k in x)


def err(res) -> str:
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def interrupted_copy(monkeypatch, src: str, dst: str, after: int = 2) -> None:
    """Run copy_cache and interrupt it (KeyboardInterrupt) after `after` chunks."""
    from kdcache.cache import share

    calls = []
    orig = share.CacheWriter.write_chunk_stored

    def dying(self, c, *a):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(c)
        orig(self, c, *a)

    monkeypatch.setattr(share.CacheWriter, "write_chunk_stored", dying)
    with pytest.raises(KeyboardInterrupt):
        copy_cache(src, dst, progress=False)
    monkeypatch.undo()


@pytest.mark.parametrize("dst_suffix", [".zarr", ".h5"])
def test_pull_is_bit_identical_resumable_and_repairs(tmp_path, dst_suffix, monkeypatch):
    src = write(tmp_path / "src.zarr")
    dst = tmp_path / f"dst{dst_suffix}"
    interrupted_copy(monkeypatch, src, str(dst))
    assert not dst.exists() and (tmp_path / f"dst.partial{dst_suffix}").exists()
    assert lockmod.read_lock(str(dst)) is None  # released on the way out
    res = cli("cache", "pull", src, dst, "--no-progress")
    assert "2 chunks copied, 2 already there" in res.output
    assert same_bytes(src, dst) and verify(str(dst)) == []
    assert not (tmp_path / f"dst.partial{dst_suffix}").exists()
    assert "0 chunks copied, 4 already there" in cli("cache", "pull", src, dst).output
    # a chunk damaged after the pull: verify names it, training refuses, pull repairs it
    if dst_suffix == ".zarr":
        shard = dst / "logits" / "c" / "1" / "0" / "0"
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        with h5py.File(dst, "r+") as f:
            f["logits"][20] = 0
    res = cli("cache", "verify", dst, ok=False)
    assert res.exit_code == 1 and "chunk 1 (samples 16..31)" in res.output
    with pytest.raises(CacheCorruptError, match="chunk 1"):
        open_cache(str(dst)).load()
    assert "1 chunks copied, 3 already there" in cli("cache", "pull", src, dst).output
    assert same_bytes(src, dst) and verify(str(dst)) == []


def test_copy_refusals_write_nothing(tmp_path):
    src = write(tmp_path / "src.zarr")
    other = write(tmp_path / "other.zarr", respec("views", seed=4))
    before = {p.name for p in tmp_path.iterdir()}
    other_bytes = raw_arrays(other)["logits"].tobytes()
    msg = err(cli("cache", "push", src, other, ok=False))
    assert "holds a different cache (views.seed: cache has 4, asked 0)" in msg
    assert "refusing to overwrite" in msg and raw_arrays(other)["logits"].tobytes() == other_bytes
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    assert "not a zarr cache" in err(cli("cache", "pull", tmp_path / "plain", tmp_path / "y.zarr",
                                         ok=False))  # fmt: skip
    assert "no cache at" in err(cli("cache", "pull", tmp_path / "nope.zarr", tmp_path / "z.zarr",
                                    ok=False))  # fmt: skip
    bad_dir = tmp_path / "plain" / "x.txt" / "dir.zarr"  # its folder cannot be made: a file
    assert "cannot create the directory" in err(cli("cache", "pull", src, bad_dir, ok=False))
    assert {p.name for p in tmp_path.iterdir()} == before | {"plain"}
    cli("cache", "pull", src, tmp_path / "no" / "dir.zarr")  # a new folder is made, as precompute
    assert (
        raw_arrays(tmp_path / "no" / "dir.zarr")["logits"].tobytes()
        == raw_arrays(src)["logits"].tobytes()
    )
    # a second writer is refused with the owner; --break-lock takes over
    w = create_cache(str(tmp_path / "busy.zarr"), make_spec(), labels=LABELS, keys=KEYS)
    msg = err(cli("cache", "pull", src, tmp_path / "busy.zarr", ok=False))
    assert f"@{os.uname().nodename} pid {os.getpid()} since" in msg and "--break-lock" in msg
    for c in w.todo_chunks()[:1]:
        s, e = w.chunk_range(c)
        w.write_chunk(c, LOGITS[s:e], VIEWS[s:e])
    res = cli("cache", "pull", src, tmp_path / "busy.zarr", "--break-lock")
    assert "3 chunks copied, 1 already there" in res.output
    w.lock.held = False  # its lock was broken: nothing to release


def test_merge_half_caches_equals_one_go_and_teachers_store(tmp_path):
    ref = write(tmp_path / "ref.zarr")
    write(tmp_path / "alice.zarr", chunks=[0, 1], finalize=False)
    write(tmp_path / "bob.h5", chunks=[2, 3], finalize=False)
    cli("cache", "merge", tmp_path / "all.zarr", tmp_path / "alice.zarr", tmp_path / "bob.h5")
    assert same_bytes(ref, tmp_path / "all.zarr") and verify(str(tmp_path / "all.zarr")) == []
    # several teachers on the same dataset and views -> one multi-teacher store
    t2 = write(tmp_path / "t2.zarr", respec("teacher", name="toy2", weights_sha256="x"))
    for out in ("team.zarr", "team.h5"):
        res = cli("cache", "merge", tmp_path / out, ref, t2)
        assert "multi-teacher store (toy, toy2)" in res.output
        assert verify(str(tmp_path / out)) == []
        members = open_members(str(tmp_path / out))
        assert [m.spec.teacher["name"] for m in members] == ["toy", "toy2"]
        np.testing.assert_array_equal(members[1].read([3], [1]), open_cache(t2).read([3], [1]))
    assert "[t1]" in cli("cache", "info", tmp_path / "team.h5").output
    rows = cli("cache", "ls", tmp_path).output
    assert "team.zarr/t1" in rows and "toy2" in rows
    copy_cache(str(tmp_path / "team.zarr"), str(tmp_path / "copy.h5"), progress=False)
    assert verify(str(tmp_path / "copy.h5")) == []
    with pytest.raises(KdcacheError, match="multi-teacher store"):
        open_cache(str(tmp_path / "team.zarr"))
    # refusals name the field and write nothing
    odd = write(tmp_path / "odd.zarr", respec("views", seed=3))
    msg = err(cli("cache", "merge", tmp_path / "bad.zarr", ref, odd, ok=False))
    assert "views.seed: 3 in" in msg and "same dataset and views" in msg
    keys = [k + "x" for k in KEYS]  # another dataset: other sample keys, other fingerprint
    w = create_cache(str(tmp_path / "fp.zarr"), respec("dataset", fingerprint=dataset_fingerprint(
        keys, LABELS)), labels=LABELS, keys=keys)  # fmt: skip
    w.close()
    msg = err(cli("cache", "merge", tmp_path / "bad.zarr", ref, tmp_path / "fp.zarr", ok=False))
    assert "dataset.fingerprint: " in msg
    write(tmp_path / "half.zarr", chunks=[0], finalize=False)
    msg = err(cli("cache", "merge", tmp_path / "bad.zarr", tmp_path / "half.zarr", ok=False))
    assert "no shard has chunks [1, 2, 3]" in msg
    assert "exists" in err(cli("cache", "merge", tmp_path / "all.zarr", ref, ok=False))
    assert not any(p.name.startswith("bad") for p in tmp_path.iterdir())


def test_convert_round_trip_and_plain_readers(tmp_path):
    src = write(tmp_path / "a.zarr", make_spec(dtype="bfloat16"))
    cli("cache", "convert", src, tmp_path / "b.h5")
    cli("cache", "convert", tmp_path / "b.h5", tmp_path / "c.zarr", "--compression", "zstd")
    assert same_bytes(src, tmp_path / "b.h5") and same_bytes(src, tmp_path / "c.zarr")
    cli("cache", "convert", src, tmp_path / "f32.zarr", "--dtype", "float32")
    with open_cache(src) as a, open_cache(str(tmp_path / "f32.zarr")) as b:
        np.testing.assert_array_equal(a.read_chunk(2), b.read_chunk(2))  # bf16 -> f32 exact
    # interoperability: plain zarr / h5py, no kdcache import needed
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert g.attrs["kdcache"]["complete"] and g["logits"].shape == (50, 3, 7)
    with h5py.File(tmp_path / "b.h5", "r") as f:
        import json

        assert json.loads(f.attrs["kdcache"])["spec"]["storage"]["dtype"] == "bfloat16"


def test_distill_reads_sparse_and_multi_teacher_caches(tmp_path):
    """Stage 2 on a sampled cache and on a merged two-teacher store (ensembled)."""
    from kdcache.distill.config import DistillConfig
    from kdcache.distill.setup import build_run
    from kdcache.models.runtime import init_runtime

    from tests.test_distill import TRAIN, _cache

    a = _cache(tmp_path, "a.zarr", n=32, extra=("--topk", "4"))
    b = _cache(tmp_path, "b.zarr", n=32, weight_seed=1, extra=("--sampled", "16"))
    cli("cache", "merge", tmp_path / "team.zarr", a, b)
    run = ["distill", "--student", "resnet8", "--loss", "kd", "--epochs", "1", "--test-split",
           "none", *TRAIN, "--max-samples", "32"]  # fmt: skip
    res = cli(*run, "--cache", tmp_path / "team.zarr", "--out", tmp_path / "r1")
    assert "done: epoch 1" in res.output
    cfg = DistillConfig(student="resnet8", loss="kd", caches=[str(tmp_path / "team.zarr")],
                        max_samples=32, test_split="none")  # fmt: skip
    r = build_run(cfg, init_runtime("cpu"))
    s, aug = np.arange(6), np.array([0, 1, 2, 0, 1, 2])
    ca, cb = open_cache(a), open_cache(b)
    want = (ca.read(s, aug) + cb.read(s, aug)) / 2
    np.testing.assert_allclose(r.teacher.logits(s, aug).numpy(), want, rtol=1e-5, atol=1e-5)
    assert cb.storage_kind == "sampled" and ca.storage_kind == "topk"
