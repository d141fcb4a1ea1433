"""Contract tests of the cache store, run identically against the zarr and HDF5 backends."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from kdcache.cache import lock as lockmod
from kdcache.cache.backends import ZarrBackend, open_backend
from kdcache.cache.errors import CacheLockedError, KdcacheError
from kdcache.cache.reader import InMemoryLogits, choose_augs, iter_epoch, training_source
from kdcache.cache.spec import CacheSpec, dataset_fingerprint
from kdcache.cache.store import create_cache, merge_shards, open_cache, shard_path
from kdcache.cache.tools import format_info, info
from kdcache.cache.verify import verify

REPO = Path(__file__).resolve().parents[1]
N, A, C, P, CS = 50, 3, 7, 2, 16  # 4 chunks, the last one holds 2 samples
KEYS = [f"toy/train/{i:05d}" for i in range(N)]
LABELS = np.arange(N) % C
RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(N, A, C)) * 4).astype(np.float32)
VIEWS = RNG.uniform(size=(N, A, P)).astype(np.float32)


def make_spec(**storage) -> CacheSpec:
    return CacheSpec(
        teacher={"name": "toy", "source": "test", "num_classes": C},
        dataset={"name": "toy", "split": "train", "n": N,
                 "fingerprint": dataset_fingerprint(KEYS, LABELS)},
        views={"policy": "crop", "num_augs": A, "param_dim": P, "seed": 0},
        storage={"chunk_samples": CS, **storage},
    )  # fmt: skip


def respec(section: str, **kv) -> CacheSpec:
    d = make_spec().to_dict()
    d[section] = {**d[section], **kv}
    return CacheSpec.from_dict(d)


def write(path, spec=None, chunks=None, finalize=True, **kw):
    w = create_cache(str(path), spec or make_spec(), labels=LABELS, keys=KEYS, **kw)
    for c in w.todo_chunks() if chunks is None else chunks:
        s, e = w.chunk_range(c)
        w.write_chunk(c, LOGITS[s:e], VIEWS[s:e])
    if finalize:
        w.finalize()
    w.close()
    return str(path)


def raw_arrays(path) -> dict:
    b = open_backend(str(path), False)
    try:
        return {k: np.asarray(b.read(k)) for k in ("logits", "view_params", "checksums", "done")}
    finally:
        b.close()


def run_child(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


CHILD = """
import json, numpy as np, sys
sys.path.insert(0, {repo!r})
from kdcache.cache.spec import CacheSpec
from kdcache.cache.store import create_cache
spec = CacheSpec.from_dict(json.loads({spec!r}))
LABELS = np.arange({n}) % {c}
LOGITS, VIEWS = np.load({data!r} + "/l.npy"), np.load({data!r} + "/v.npy")
KEYS = [f"toy/train/{{i:05d}}" for i in range({n})]
"""


def child_preamble(tmp_path: Path) -> str:
    """Code that gives a child process the same spec and data (without importing pytest)."""
    np.save(tmp_path / "l.npy", LOGITS)
    np.save(tmp_path / "v.npy", VIEWS)
    spec = make_spec().to_json()
    return CHILD.format(repo=str(REPO), spec=spec, n=N, c=C, data=str(tmp_path))


@pytest.fixture(params=["zarr", "hdf5"])
def backend(request):
    return request.param


@pytest.fixture
def path(tmp_path, backend):
    return tmp_path / ("cache.zarr" if backend == "zarr" else "cache.h5")


class TestContract:
    def test_round_trip(self, path, backend, monkeypatch):
        monkeypatch.setattr(
            "kdcache.cache.backends.INNER_CHUNK_BYTES", 256
        )  # 3 rows per inner chunk
        write(path, make_spec(dtype="float32"))
        with open_cache(str(path)) as c:
            assert (c.n, c.num_augs, c.num_classes, c.n_chunks) == (N, A, C, 4)
            assert c.backend_name == backend and c.is_complete() and c.done().all()
            assert c.chunk_range(3) == (48, 50)
            assert c.keys() == KEYS and c.labels().dtype == np.int64
            np.testing.assert_array_equal(c.labels(), LABELS)
            np.testing.assert_array_equal(c.read_chunk(1), LOGITS[16:32])
            s, a = np.array([49, 3, 3, 20]), np.array([2, 0, 1, 1])
            np.testing.assert_array_equal(c.read(s, a), LOGITS[s, a])
            np.testing.assert_array_equal(c.view_params(), VIEWS)
            np.testing.assert_array_equal(c.view_params([5, 1]), VIEWS[[5, 1]])
            np.testing.assert_array_equal(c.load().read(s, a), LOGITS[s, a])
            meta = c.attrs
            assert meta["key"] == make_spec(dtype="float32").key() == c.key
            assert meta["counts"] == {"n": N, "num_augs": A, "num_classes": C, "n_chunks": 4}
            assert len(meta["checksums"]) == 4 and meta["complete"] is True
            assert {"kdcache", "numpy", "zarr", "h5py", "created_at"} <= set(meta["provenance"])
        assert verify(str(path)) == []
        d = info(str(path))
        assert (d["done_chunks"], d["n_chunks"], d["complete"]) == (4, 4, True)
        assert d["size_bytes"] > N * A * C * 4 // 2 and "4/4 done, complete" in format_info(d)
        # plain zarr / h5py can read the arrays (keys as strings)
        if backend == "zarr":
            g = zarr.open_group(str(path), mode="r")
            assert str(g["keys"][7]) == KEYS[7] and g.attrs["kdcache"]["complete"]
            assert g["logits"].shards == (CS, A, C) and g["logits"].chunks == (2, A, C)
        else:
            with h5py.File(path, "r") as f:
                assert f["keys"].asstr()[7] == KEYS[7] and f["logits"].chunks == (2, A, C)

    @pytest.mark.parametrize("dtype,rtol", [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0)])
    def test_dtypes(self, path, dtype, rtol):
        write(path, make_spec(dtype=dtype))
        with open_cache(str(path)) as c:
            got = c.load().read(np.arange(N), np.arange(N) % A)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, LOGITS[np.arange(N), np.arange(N) % A], rtol=rtol)
            assert c._b.stored_dtype("logits") == dtype
            if dtype == "bfloat16":
                assert np.asarray(c._b.read("logits", 0, 1)).dtype == np.uint16
        assert verify(str(path)) == []

    def test_bfloat16_rounds_to_nearest_even(self, path):
        w = create_cache(str(path), make_spec(dtype="bfloat16"), labels=LABELS, keys=KEYS)
        x = np.zeros((CS, A, C), np.float32)
        x[0, 0, :3] = [1.0, 1 + 2**-8, 1 + 3 * 2**-8]  # exact, tie -> even (1.0), tie -> up
        w.write_chunk(0, x, np.zeros((CS, A, P)))
        assert w._b.read("logits", 0, 1)[0, 0, :3].tolist() == [0x3F80, 0x3F80, 0x3F82]
        np.testing.assert_array_equal(w.read_chunk(0)[0, 0, :3], [1.0, 1.0, 1 + 2**-6])
        w.close()

    def test_compression(self, path, backend):
        write(path, make_spec(compression="gzip"))
        np.testing.assert_allclose(
            open_cache(str(path)).read([4], [1]), LOGITS[[4], [1]], rtol=1e-3
        )
        assert verify(str(path)) == []
        zpath = path.with_name("z" + path.name)
        if backend == "zarr":
            write(zpath, make_spec(compression="zstd"))
            assert verify(str(zpath)) == []
        else:
            with pytest.raises(KdcacheError, match="zstd"):
                write(zpath, make_spec(compression="zstd"))
            assert not zpath.exists() and not Path(lockmod.lock_path(str(zpath))).exists()

    def test_resume_after_sigkill(self, path, tmp_path):
        ref = write(tmp_path / ("ref" + path.suffix))
        code = (
            child_preamble(tmp_path)
            + f"""
import os, signal
w = create_cache({str(path)!r}, spec, labels=LABELS, keys=KEYS)
for c in (0, 1):
    s, e = w.chunk_range(c)
    w.write_chunk(c, LOGITS[s:e], VIEWS[s:e])
orig = w._b.write
def killing_write(name, start, data):
    orig(name, start, data)
    if name == "logits":
        os.kill(os.getpid(), signal.SIGKILL)  # mid-chunk: logits written, no checksum, no done
w._b.write = killing_write
w.write_chunk(2, LOGITS[32:48], VIEWS[32:48])
"""
        )
        proc = run_child(code)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert any("incomplete: 2 of 4 chunks not done: [2, 3]" in p for p in verify(str(path)))
        assert (info(str(path))["done_chunks"], info(str(path))["complete"]) == (2, False)
        # the killed writer's lock is provably stale (same host, dead pid): taken over
        w = create_cache(str(path), make_spec(), labels=LABELS, keys=KEYS)
        assert w.todo_chunks() == [2, 3] and w.todo_chunks(1, 2) == [3]
        w.close()
        write(path)
        got, want = raw_arrays(path), raw_arrays(ref)
        for name in want:
            assert got[name].tobytes() == want[name].tobytes(), name
        assert verify(str(path)) == []
        assert open_cache(str(path)).attrs["checksums"] == open_cache(ref).attrs["checksums"]

    def test_lock_refusal_and_break(self, path):
        w = create_cache(str(path), make_spec(), labels=LABELS, keys=KEYS)
        msg = f"{os.uname().nodename} pid {os.getpid()} since .*may still be running.*--break-lock"
        with pytest.raises(CacheLockedError, match=msg):
            create_cache(str(path), make_spec(), labels=LABELS, keys=KEYS)
        with pytest.raises(CacheLockedError):
            open_cache(str(path), "a")
        w.close()
        assert lockmod.read_lock(str(path)) is None  # released on close
        dead = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
        dead.wait()
        record = {"user": "x", "host": "elsewhere", "pid": dead.pid, "time": "t0"}
        Path(lockmod.lock_path(str(path))).write_text(json.dumps(record))
        with pytest.raises(CacheLockedError, match=f"x@elsewhere pid {dead.pid} since t0"):
            open_cache(str(path), "a")  # another host's lock cannot be checked: refused
        w = open_cache(str(path), "a", break_lock=True)
        assert lockmod.read_lock(str(path))["pid"] == os.getpid()
        s, e = w.chunk_range(0)
        w.write_chunk(0, LOGITS[s:e], VIEWS[s:e])
        w.close()
        assert lockmod.read_lock(str(path)) is None and open_cache(str(path)).done()[0]
        record["host"] = os.uname().nodename  # same host, dead pid: a killed run, taken over
        Path(lockmod.lock_path(str(path))).write_text(json.dumps(record))
        open_cache(str(path), "a").close()
        assert lockmod.read_lock(str(path)) is None

    def test_corrupted_chunk_detected(self, path):
        write(path)
        b = open_backend(str(path), True)
        raw = np.asarray(b.read("logits", 16, 32)).copy()
        raw.view(np.uint8).reshape(-1)[10:14] ^= 0xFF
        b.write("logits", 16, raw)
        bad = np.asarray(b.read("logits", 32, 48)).copy()
        bad[3, 0, 0] = np.nan
        b.write("logits", 32, bad)
        b.set_meta({**b.get_meta(), "checksums": ["00" * 32] + b.get_meta()["checksums"][1:]})
        b.close()
        problems = verify(str(path))
        assert any("chunk 1 (samples 16..31): checksum mismatch" in p for p in problems)
        assert any("chunk 2" in p and "NaN/Inf logits at samples [35]" in p for p in problems)
        assert any("differ from the checksums array at chunks [0]" in p for p in problems)
        assert not any("chunk 0" in p or "chunk 3" in p for p in problems)

    def test_bad_inputs(self, path, tmp_path, backend):
        w = create_cache(str(path), make_spec(), labels=LABELS, keys=KEYS)
        with pytest.raises(KdcacheError, match=r"shape \(16, 2, 7\); expected \(16, 3, 7\)"):
            w.write_chunk(0, LOGITS[:16, :2], VIEWS[:16])
        with pytest.raises(KdcacheError, match="view_params for chunk 0"):
            w.write_chunk(0, LOGITS[:16], VIEWS[:16, :, :1])
        nan = LOGITS[16:32].copy()
        nan[[3, 5], 1, 2] = np.inf
        with pytest.raises(
            KdcacheError, match=r"NaN/Inf in logits of chunk 1 at samples \[19, 21\]"
        ):
            w.write_chunk(1, nan, VIEWS[16:32])
        with pytest.raises(KdcacheError, match=r"overflow float16 at samples \[16\]"):
            w.write_chunk(
                1, np.where(np.arange(16)[:, None, None] == 0, 1e6, LOGITS[16:32]), VIEWS[16:32]
            )
        with pytest.raises(KdcacheError, match="chunk 9 out of range"):
            w.write_chunk(9, LOGITS[:16], VIEWS[:16])
        assert not w.done().any() and not np.asarray(w._b.read("logits")).any()  # nothing written
        with pytest.raises(KdcacheError, match="cannot finalize .* 4 of 4 chunks not done"):
            w.finalize()
        with pytest.raises(KdcacheError, match="incomplete"):
            w.load()
        w.close()
        with pytest.raises(KdcacheError, match="views.num_augs: cache has 3, asked 4"):
            create_cache(str(path), respec("views", num_augs=4), labels=LABELS, keys=KEYS)
        with pytest.raises(KdcacheError, match="labels have shape"):
            create_cache(str(path), make_spec(), labels=LABELS[:3], keys=KEYS)
        with pytest.raises(KdcacheError, match="fingerprint"):
            create_cache(str(path), make_spec(), labels=LABELS[::-1].copy(), keys=KEYS)
        b = open_backend(str(path), True)
        b.set_meta({**b.get_meta(), "format_version": 7})
        b.close()
        with pytest.raises(KdcacheError, match="format_version 7; this kdcache reads 1"):
            open_cache(str(path))
        with pytest.raises(KdcacheError, match="unknown cache backend 'lmdb'"):
            create_cache(str(tmp_path / "x"), make_spec(), labels=LABELS, keys=KEYS, backend="lmdb")
        with pytest.raises(KdcacheError, match="suffix"):
            create_cache(str(tmp_path / "x.bin"), make_spec(), labels=LABELS, keys=KEYS)
        with pytest.raises(KdcacheError, match="does not exist"):
            open_cache(str(tmp_path / "missing.zarr"))
        with pytest.raises(KdcacheError, match="not a zarr cache"):
            open_cache(str(tmp_path))
        (tmp_path / "text.h5").write_text("hello")
        with pytest.raises(KdcacheError, match="not an HDF5 file"):
            open_cache(str(tmp_path / "text.h5"))
        zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
        with pytest.raises(KdcacheError, match="not a kdcache cache"):
            open_cache(str(tmp_path / "plain.zarr"))
        with pytest.raises(KdcacheError, match="unknown open mode"):
            open_cache(str(tmp_path / "plain.zarr"), "w")

    def test_overwrite_different_spec(self, path):
        write(path, make_spec(dtype="float32"))
        with pytest.raises(KdcacheError, match="storage.dtype: cache has 'float32', asked"):
            write(path)
        with pytest.raises(KdcacheError, match="different spec"):
            write(path, lock=False, overwrite=True)  # ranks without the lock never delete
        write(path, overwrite=True)
        assert open_cache(str(path)).dtype == "float16" and verify(str(path)) == []

    def test_iter_epoch(self, path):
        write(path)
        cache = open_cache(str(path))
        ram = cache.load(memory_budget=10**6)
        for src in (cache, ram):
            batches = list(iter_epoch(src, 8, seed=3, epoch=1))
            s = np.concatenate([b[0] for b in batches])
            a = np.concatenate([b[1] for b in batches])
            assert sorted(s.tolist()) == list(range(N)) and not (s == np.arange(N)).all()
            np.testing.assert_array_equal(a, choose_augs(3, 1, s, A))
            assert [len(b[0]) for b in batches] == [8] * 6 + [2]
            for bs, ba, bl in batches:
                np.testing.assert_allclose(bl, LOGITS[bs, ba], rtol=1e-3)
            again = np.concatenate([b[0] for b in iter_epoch(src, 8, seed=3, epoch=1)])
            np.testing.assert_array_equal(again, s)
            other = np.concatenate([b[0] for b in iter_epoch(src, 8, seed=3, epoch=2)])
            assert not (other == s).all()
            pairs = [
                (i, j)
                for b in iter_epoch(src, 5, 3, 1, aug_mode="all")
                for i, j in zip(*b[:2], strict=True)
            ]
            assert sorted(pairs) == [(i, j) for i in range(N) for j in range(A)]
            assert all((b[1] == 2).all() for b in iter_epoch(src, 5, 3, 1, aug_mode=2))
            ranks = [np.concatenate([b[0] for b in iter_epoch(src, 4, 3, 1, rank=r, world_size=3)])
                     for r in range(3)]  # fmt: skip
            assert sorted(np.concatenate(ranks).tolist()) == list(range(N))
            assert sum(len(b[0]) for b in iter_epoch(src, 8, 3, 1, drop_last=True)) == 48
            kw = {"aug_mode": "all", "world_size": 2, "drop_last": True}
            steps = [len(list(iter_epoch(src, 4, 3, 1, rank=r, **kw))) for r in range(2)]
            assert steps[0] == steps[1] > 0  # equal step counts on every rank (DDP)
        assert (choose_augs(3, 1, np.arange(N), A) != choose_augs(3, 2, np.arange(N), A)).any()
        with pytest.raises(KdcacheError, match="memory budget"):
            cache.load(memory_budget=100)
        with pytest.raises(KdcacheError, match="aug_mode"):
            next(iter_epoch(ram, 4, 0, 0, aug_mode="some"))
        assert isinstance(ram, InMemoryLogits) and ram.nbytes == N * A * C * 2
        assert isinstance(training_source(cache, 10**6), InMemoryLogits)
        assert training_source(cache, 10) is cache  # over budget: chunk-aware

    def test_merge_shards(self, path, tmp_path):
        ref = write(tmp_path / ("ref" + path.suffix))
        shards = [str(shard_path(str(path), r)) for r in range(2)]
        for r in range(2):
            write(shards[r], chunks=[0, 2] if r == 0 else [1, 3], finalize=False)
        assert merge_shards(str(path), shards) == str(path)
        got, want = raw_arrays(path), raw_arrays(ref)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)
        assert verify(str(path)) == [] and open_cache(str(path)).keys() == KEYS
        other = str(tmp_path / ("cross.h5" if path.suffix == ".zarr" else "cross.zarr"))
        merge_shards(other, shards)  # shards of one backend into a cache of the other
        assert raw_arrays(other)["logits"].tobytes() == want["logits"].tobytes()
        out2 = str(tmp_path / "x.zarr")
        both = str(tmp_path / "both.zarr")  # chunks 0 and 2 done in both, byte-identical
        merge_shards(both, [shards[0], ref])
        assert raw_arrays(both)["logits"].tobytes() == want["logits"].tobytes()
        bad = str(tmp_path / ("bad" + path.suffix))  # chunk 0 done again, other logits
        w = create_cache(bad, make_spec(), labels=LABELS, keys=KEYS)
        s, e = w.chunk_range(0)
        w.write_chunk(0, LOGITS[s:e] + 1, VIEWS[s:e])
        w.close()
        with pytest.raises(KdcacheError, match="chunk 0 is done in both .* different checksums"):
            merge_shards(out2, [shards[0], shards[1], bad])
        with pytest.raises(KdcacheError, match=r"no shard has chunks \[1, 3\]"):
            merge_shards(out2, shards[:1])
        odd = str(tmp_path / ("odd" + path.suffix))
        write(odd, respec("views", seed=5), chunks=[1, 3], finalize=False)
        with pytest.raises(KdcacheError, match="views.seed: cache has 5, asked 0"):
            merge_shards(out2, [shards[0], odd])
        assert not os.path.exists(out2)

    def test_second_writer_lock_false(self, path, tmp_path, backend, monkeypatch):
        ref = write(tmp_path / ("ref" + path.suffix))
        w0 = create_cache(str(path), make_spec(), labels=LABELS, keys=KEYS)
        code = (
            child_preamble(tmp_path)
            + f"""
w = create_cache({str(path)!r}, spec, labels=LABELS, keys=KEYS, lock=False)
assert w.todo_chunks(1, 2) == [1, 3]
for c in w.todo_chunks(1, 2):
    s, e = w.chunk_range(c)
    w.write_chunk(c, LOGITS[s:e], VIEWS[s:e])
w.close()
"""
        )
        if backend == "hdf5":  # one writer per HDF5 file: ranks write shards, merge joins them
            proc = run_child(code)
            assert "open for writing by another process" in proc.stdout + proc.stderr
            w0.close()
            return
        stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
        proc = run_child(code)  # rank 1 writes chunks 1, 3 while rank 0 holds the lock
        assert proc.returncode == 0, proc.stderr
        for p in (path / "zarr.json", path / "labels" / "c" / "0", path / "keys" / "c" / "0"):
            assert p.stat().st_mtime_ns == stamps[p]  # attrs and labels/keys not rewritten
        calls = []
        monkeypatch.setattr(ZarrBackend, "set_meta", lambda *a: calls.append(a))
        monkeypatch.setattr(ZarrBackend, "write", lambda *a: calls.append(a))
        w1 = create_cache(str(path), make_spec(), labels=LABELS, keys=KEYS, lock=False)
        monkeypatch.undo()
        assert calls == [] and w1.todo_chunks() == [0, 2] and w1.lock is None
        for c in w0.todo_chunks(0, 2):
            s, e = w0.chunk_range(c)
            w0.write_chunk(c, LOGITS[s:e], VIEWS[s:e])
        w0.finalize()
        assert lockmod.read_lock(str(path)) is None and open_cache(str(path)).is_complete()
        got, want = raw_arrays(path), raw_arrays(ref)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)
        assert verify(str(path)) == []
