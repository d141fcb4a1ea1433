"""Sparse caches (top-k + tail mass, sampled RS-KD targets): encoding, rebuilt targets,
determinism, unbiasedness, storage through both backends, convert and the KL report."""

import json

import numpy as np
import pytest
from kdcache.cache.backends import open_backend
from kdcache.cache.errors import CacheCorruptError, KdcacheError
from kdcache.cache.reader import iter_epoch
from kdcache.cache.sparse import SampledCodec, TopKCodec, get_codec, kl_sum
from kdcache.cache.store import open_cache
from kdcache.cache.verify import verify

from tests.clitools import cli
from tests.test_cache import LOGITS, A, C, N, make_spec, write


def softmax(x, t=1.0):
    z = np.asarray(x, np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def big_logits(n=64, a=2, c=100, seed=1):
    return (np.random.default_rng(seed).normal(size=(n, a, c)) * 3).astype(np.float32)


def spec_for(n, a, c, **storage):
    d = make_spec().to_dict()
    d["teacher"]["num_classes"], d["dataset"]["n"], d["views"]["num_augs"] = c, n, a
    d["dataset"].pop("fingerprint")
    d["storage"].update(storage)
    from kdcache.cache.spec import CacheSpec

    return CacheSpec.from_dict(d)


def test_topk_rebuilds_exact_top_probabilities_and_tail_mass():
    z = big_logits()
    codec = TopKCodec(spec_for(64, 2, 100, topk=10, dtype="float32"))
    arrays = codec.encode(z, 0)
    assert arrays["topk_indices"].dtype == np.int16 and arrays["tail_logsumexp"].shape == (64, 2)
    rebuilt = codec.decode(arrays)
    p, q = softmax(z), softmax(rebuilt)
    idx = arrays["topk_indices"].astype(int)
    np.testing.assert_allclose(
        np.take_along_axis(q, idx, -1), np.take_along_axis(p, idx, -1), rtol=1e-5
    )
    tail = 1 - np.take_along_axis(p, idx, -1).sum(-1)
    np.testing.assert_allclose(1 - np.take_along_axis(q, idx, -1).sum(-1), tail, atol=1e-6)
    top_p = np.take_along_axis(p, np.argsort(-z, -1)[..., :10], -1)
    np.testing.assert_allclose(np.sort(top_p, -1), np.sort(np.take_along_axis(p, idx, -1), -1))
    # the only error left is the tail's shape: KL <= tail mass * log(C - K) (uniform spread)
    kl1 = kl_sum(z, rebuilt, 1.0) / (64 * 2)
    assert 0 <= kl1 <= float((tail * np.log(90)).mean()) + 1e-6
    assert kl_sum(z, rebuilt, 4.0) / 128 < 0.5  # approximate at T != 1, still bounded


def test_sampled_is_deterministic_unique_and_unbiased():
    z = big_logits(n=8, a=3, c=20)
    spec = spec_for(8, 3, 20, sampled=16)
    codec = SampledCodec(spec)
    arrays = codec.encode(z, 0)
    idx, cnt = arrays["sampled_indices"], arrays["sampled_counts"]
    assert cnt.dtype == np.uint8 and (cnt.sum(-1) == 16).all()
    for row_i, row_c in zip(idx.reshape(-1, 16), cnt.reshape(-1, 16), strict=True):
        used = row_i[row_c > 0]
        assert len(set(used.tolist())) == len(used) and (row_i[row_c == 0] == -1).all()
    again = codec.encode(z, 0)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    # keyed by (seed, sample, aug) only: encoding rows 4..7 alone gives the same rows
    part = codec.encode(z[4:], 4)
    assert np.array_equal(part["sampled_indices"], idx[4:])
    # unbiased: the mean of counts/K over many seeds converges to softmax(z)
    q = np.mean([SampledCodec(respec_seed(spec, s)).probs(SampledCodec(respec_seed(spec, s))
                 .encode(z, 0)) for s in range(300)], axis=0)  # fmt: skip
    assert np.abs(q - softmax(z)).max() < 0.03
    rebuilt = softmax(codec.decode(arrays))
    np.testing.assert_allclose(rebuilt, codec.probs(arrays) * (1 - 1e-4) + 1e-4 / 20, atol=1e-6)


def respec_seed(spec, seed):
    from kdcache.cache.spec import CacheSpec

    d = spec.to_dict()
    d["views"]["seed"] = seed
    return CacheSpec.from_dict(d)


def test_spec_validation_and_key():
    assert make_spec(topk=3).key() != make_spec().key() != make_spec(sampled=3).key()
    assert "sampled" not in make_spec().storage  # dense keys are unchanged by the new field
    with pytest.raises(KdcacheError, match="topk 7 must be smaller than num_classes 7"):
        make_spec(topk=7)
    with pytest.raises(KdcacheError, match="exclude each other"):
        make_spec(topk=2, sampled=3)
    with pytest.raises(KdcacheError, match="storage.sampled is 0"):
        make_spec(sampled=0)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("storage", [{"topk": 3}, {"sampled": 6}])
def test_sparse_cache_write_read_verify(tmp_path, suffix, storage):
    path = write(tmp_path / f"s{suffix}", make_spec(**storage))
    assert verify(path) == []
    codec = get_codec(make_spec(**storage))
    with open_cache(path) as c:
        assert c.storage_kind == codec.kind and c.nbytes() < N * A * C * 2 + N * A * 8
        want = np.concatenate([codec.decode(codec.encode(LOGITS[s:s + 16], s))
                               for s in range(0, N, 16)])  # fmt: skip
        np.testing.assert_allclose(np.concatenate([c.read_chunk(k) for k in range(4)]), want,
                                   rtol=2e-3, atol=2e-3)  # fmt: skip
        s, a = np.array([49, 3, 20]), np.array([2, 0, 1])
        np.testing.assert_allclose(c.read(s, a), want[s, a], rtol=2e-3, atol=2e-3)
        mem = c.load()
        np.testing.assert_array_equal(mem.read(s, a), c.read(s, a))
        assert mem.full().shape == (N, A, C)
        for src in (c, mem):
            got = {(int(i), int(j)): row for b in iter_epoch(src, 8, 0, 0) for i, j, row in
                   zip(b[0], b[1], b[2], strict=True)}  # fmt: skip
            assert len(got) == N
            for (i, j), row in got.items():
                np.testing.assert_array_equal(row, mem.read([i], [j])[0])
    names = codec.names
    be = open_backend(path, True)  # flip one stored value of chunk 1

    x = np.asarray(be.read(names[-1], 16, 32)).copy()
    x.reshape(-1)[0] = x.reshape(-1)[1] + 1 if x.dtype.kind != "f" else x.reshape(-1)[0] + 1
    be.write(names[-1], 16, x)
    be.close()
    assert any("chunk 1 (samples 16..31): checksum mismatch" in p for p in verify(path))
    with pytest.raises(CacheCorruptError, match="chunk 1 .* fails its checksum"):
        open_cache(path).load()


def test_convert_dense_to_sparse_reports_kl_and_bytes(tmp_path):
    dense = write(tmp_path / "d.zarr", make_spec(dtype="float32"))
    res = cli("cache", "convert", dense, tmp_path / "top.h5", "--topk", "3", "--dtype", "float16")
    assert "top-3 float16" in res.output and "at T=4" in res.output
    res = cli("cache", "convert", dense, tmp_path / "s.zarr", "--sampled", "4", "--no-progress")
    info = json.loads(cli("cache", "info", tmp_path / "s.zarr", "--json").output)
    assert info["storage"] == "sampled-4" and info["entry_bytes"] == 4 * 3
    kl = info["sparse_kl"]
    assert kl["entries"] == N * A and kl["T1"] > 0 and kl["dense_key"] == make_spec(
        dtype="float32").key()  # fmt: skip
    text = cli("cache", "info", tmp_path / "top.h5").output
    assert "per entry  16 B" in text and "mean KL(dense||sparse)" in text
    # sparse -> other sparse is refused (the dense logits are gone); nothing is written
    res = cli("cache", "convert", tmp_path / "top.h5", tmp_path / "x.zarr", "--sampled", "4",
              ok=False)  # fmt: skip
    assert res.exit_code == 2 and "dense ones only" in res.output.splitlines()[-1]
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.partial.zarr").exists()
    # but a sparse cache changes format with the same bytes
    cli("cache", "convert", tmp_path / "top.h5", tmp_path / "top.zarr")
    with open_cache(str(tmp_path / "top.h5")) as a, open_cache(str(tmp_path / "top.zarr")) as b:
        assert a.attrs["checksums"] == b.attrs["checksums"] and a.key == b.key
