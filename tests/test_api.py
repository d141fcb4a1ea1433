"""The public Python API (`kdcache.__all__`): one contract test per name, bad input as
KdcacheError with the CLI's messages, and CachedDataset replaying exactly the teacher's views."""

from __future__ import annotations

import kdcache
import numpy as np
import pytest
import torch

N = 32


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> str:
    from kdcache.models.factory import create_model

    d = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model, _ = create_model("resnet8", num_classes=10)
    torch.save(model.state_dict(), d / "t.pt")
    return kdcache.precompute(
        teacher="resnet8", weights=str(d / "t.pt"), dataset="digits", max_samples=N,
        num_augs=3, chunk_samples=8, out=str(d / "c.zarr"), device="cpu",
    )  # fmt: skip


def test_all_names_resolve_and_are_documented():
    for name in kdcache.__all__:
        obj = getattr(kdcache, name)
        if name != "__version__":
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    assert isinstance(kdcache.__version__, str)
    assert issubclass(kdcache.KdcacheError, Exception)


def test_precompute_returns_the_cache_path(cache_path):
    assert cache_path.endswith("c.zarr")
    assert kdcache.open_cache(cache_path).spec.n == N


def test_open_cache_reads_full_width_float32(cache_path):
    from kdcache.cache.store import open_cache as reader

    c = kdcache.open_cache(cache_path)
    assert (len(c), c.num_views, c.num_classes) == (N, 3, 10)
    assert isinstance(c, kdcache.TeacherCache) and len(c.keys) == N and c.labels.dtype == np.int64
    raw = reader(cache_path)
    want = raw.read(np.array([1, 20]), np.array([0, 2]))
    got = c.logits([1, 20], [0, 2])
    assert got.dtype == torch.float32 and got.shape == (2, 10)
    assert torch.equal(got, torch.from_numpy(want))
    assert c.logits([1, 20]).shape == (2, 3, 10) and c.logits(5, 1).shape == (10,)
    assert torch.equal(c.logits([1, 20])[:, 2], c.logits([1, 20], 2))
    assert np.array_equal(c.view_params([3], [1]), raw.view_params(np.array([3]))[:, 1])
    loaded = kdcache.open_cache(cache_path).load()
    assert torch.equal(loaded.logits([1, 20], [0, 2]), got)
    assert c.verify() == []
    with pytest.raises(kdcache.KdcacheError, match="out of range"):
        c.logits([N], [0])


def test_open_cache_refuses_bad_paths(tmp_path, cache_path):
    with pytest.raises(kdcache.KdcacheError):
        kdcache.open_cache(tmp_path / "nothing.zarr")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(kdcache.KdcacheError):
        kdcache.open_cache(tmp_path / "file.zarr")


def test_open_cache_corrupt_chunk_is_a_kdcache_error(tmp_path, cache_path):
    import shutil

    import zarr

    copy = tmp_path / "bad.zarr"
    shutil.copytree(cache_path, copy)
    arr = zarr.open_group(str(copy), mode="r+")["logits"]
    arr[0, 0, 0] = arr[0, 0, 0] + 1  # chunk 0's bytes no longer match its checksum
    c = kdcache.open_cache(copy)
    with pytest.raises(kdcache.KdcacheError, match="checksum"):
        c.logits([0], [0])
    assert c.verify()


def test_cached_dataset_replays_the_teachers_view(cache_path):
    from kdcache.data.datasets import load_dataset
    from kdcache.data.views import get_policy

    c = kdcache.open_cache(cache_path)
    ds = kdcache.CachedDataset(c, views="one", seed=0)
    assert len(ds) == N
    src = load_dataset("digits", split="train", max_samples=N)
    policy = get_policy(c.spec.views["policy"], **(c.spec.views.get("params") or {}))
    ident = torch.from_numpy(np.asarray(policy.identity_params(), np.float32))[None]
    for row in (0, 7, 31):
        want = policy.apply(src.get(np.array([row])), ident)[0]  # the eval transform
        got = ds.cache.view_params(row, 0)
        item = ds[row] if ds.row_views(row)[1][0] == 0 else None
        all_ds = kdcache.CachedDataset(c, views="all")
        it0 = all_ds[row * 3]  # row, view 0
        assert it0["row"] == row and int(it0["view"]) == 0
        assert it0["input"].dtype == torch.uint8 and it0["input"].shape == (3, 32, 32)
        assert torch.equal(it0["input"].float() / 255, want)
        assert torch.equal(it0["teacher_logits"], c.logits(row, 0))
        assert int(it0["label"]) == int(c.labels[row])
        assert np.array_equal(got, policy.identity_params())
        if item is not None:
            assert torch.equal(item["input"], it0["input"])


def test_cached_dataset_views_epochs_and_workers(cache_path):
    from kdcache.cache.epoch import choose_augs

    ds = kdcache.CachedDataset(cache_path, views="one", seed=3)
    ds.set_epoch(2)
    want = choose_augs(3, 2, np.arange(N), 3)
    assert [int(ds[i]["view"]) for i in range(N)] == want.tolist()
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    batches = list(loader)
    assert torch.equal(torch.cat([b["view"] for b in batches]), torch.from_numpy(want))
    ds.set_epoch(5)  # reaches the persistent workers
    seen = torch.cat([b["view"] for b in loader])
    assert torch.equal(seen, torch.from_numpy(choose_augs(3, 5, np.arange(N), 3)))
    ds.set_epoch(2)
    first = [ds[i]["input"] for i in range(8)]
    assert torch.equal(batches[0]["input"], torch.stack(first))
    k = kdcache.CachedDataset(cache_path, views=2)[4]
    assert k["input"].shape == (2, 3, 32, 32) and k["teacher_logits"].shape == (2, 10)
    with pytest.raises(kdcache.KdcacheError, match="views=5"):
        kdcache.CachedDataset(cache_path, views=5)


def test_cached_dataset_refuses_other_data(tmp_path, cache_path, make_cifar):
    root, other = make_cifar(n_train=20, n_test=4), make_cifar(n_train=20, n_test=4, seed=5)
    p = kdcache.precompute(
        teacher="resnet8", random_init=0, dataset="cifar10", data_root=str(root), num_augs=2,
        out=str(tmp_path / "cifar.zarr"), device="cpu",
    )  # fmt: skip
    assert len(kdcache.CachedDataset(p)) == 20  # its own data (root from the provenance)
    with pytest.raises(kdcache.KdcacheError, match="computed on another cifar10/train"):
        kdcache.CachedDataset(p, data_root=str(other))
    c = kdcache.open_cache(cache_path)
    from kdcache.data.datasets import load_dataset
    from kdcache.data.loader import match_rows

    with pytest.raises(kdcache.KdcacheError, match="N=32 samples"):
        match_rows(c.path, c.spec, lambda: c.keys, load_dataset("digits", max_samples=N - 1))


def test_chunk_sampler_shards_chunks_by_rank(cache_path):
    ds = kdcache.CachedDataset(cache_path)
    parts = [list(kdcache.ChunkSampler(ds, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(N))  # 4 chunks of 8: no padding needed
    for p in parts:  # each rank reads whole chunks only
        assert len({i // 8 for i in p}) == 2 and len(p) == 16
    s = kdcache.ChunkSampler(ds, num_replicas=1, rank=0, seed=1)
    s.set_epoch(1)
    assert sorted(s) == list(range(N)) and list(s) != list(range(N))


def test_chunk_sampler_lanes_give_each_worker_its_own_chunks(cache_path):
    ds = kdcache.CachedDataset(cache_path, memory_budget_gb=0)
    one = kdcache.ChunkSampler(ds, seed=3, buffer_chunks=2)
    assert list(kdcache.ChunkSampler(ds, seed=3, buffer_chunks=2, lanes=1, batch_size=4)) == list(
        one
    )  # one lane: the plain order
    s = kdcache.ChunkSampler(ds, seed=3, buffer_chunks=1, lanes=2, batch_size=4)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == list(range(N)) and order == list(s)  # each once, seeded
        batches = [order[i : i + 4] for i in range(0, N, 4)]
        chunks = [{i // 8 for b in batches[w::2] for i in b} for w in (0, 1)]
        assert not chunks[0] & chunks[1] and len(chunks[0]) == 2  # worker j % 2: own chunks
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=s, num_workers=2)
    rows = [r for b in loader for r in b["row"].tolist()]  # what the workers cut, in order
    assert rows == list(s)
    with pytest.raises(kdcache.KdcacheError, match="lanes=2, batch_size=None"):
        kdcache.ChunkSampler(ds, lanes=2)
    for bad in ({"lanes": 0}, {"lanes": 1.5}, {"lanes": 2, "batch_size": 0}):
        with pytest.raises(kdcache.KdcacheError, match="expected lanes >= 1"):
            kdcache.ChunkSampler(ds, **bad)


def test_get_loss_is_the_registry_function():
    from kdcache.distill.losses import get_loss as registry

    s, t, y = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10), torch.arange(6)
    for name in ("ce", "kd", "wsl", "lsr", "tfkd-reg", "lsr-os", "lsr-os-tc"):
        loss = kdcache.get_loss(name, T=2.0) if name in ("kd", "wsl") else kdcache.get_loss(name)
        assert isinstance(loss, torch.nn.Module)
        out = loss(s, t, y)
        hp = {"T": 2.0} if name in ("kd", "wsl") else {}
        ref = registry(name, **hp)(s, t, y)
        assert torch.equal(out, ref["loss"]) and out.dim() == 0
        assert set(loss.terms) == set(ref) - {"loss"}
    out.backward()
    assert s.grad is not None
    with pytest.raises(kdcache.KdcacheError, match="did you mean 'wsl'"):
        kdcache.get_loss("wls")
    with pytest.raises(kdcache.KdcacheError):
        kdcache.get_loss("kd", T=-1)


def test_list_losses_has_hparams_and_defaults():
    rows = {r["name"]: r for r in kdcache.list_losses()}
    assert {"ce", "kd", "wsl", "mrkd", "tfkd-self"} <= set(rows)
    wsl = {h["name"]: h["default"] for h in rows["wsl"]["hparams"]}
    assert wsl == {"T": 4.0, "alpha": 2.25}


def test_api_options_are_the_clis(tmp_path, cache_path):
    with pytest.raises(kdcache.KdcacheError, match="did you mean 'num_augs'"):
        kdcache.precompute(teacher="resnet8", out=str(tmp_path / "x.zarr"), num_aug=3)
    with pytest.raises(kdcache.KdcacheError, match="batch_size|batch-size"):
        kdcache.distill(student="resnet8", batch_size=0, out=str(tmp_path / "r"))
    with pytest.raises(kdcache.KdcacheError, match="is a directory"):
        kdcache.precompute(teacher="resnet8", weights=str(tmp_path), out=str(tmp_path / "y.zarr"))
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()
    rec = kdcache.distill(
        cache=cache_path, student="resnet8", loss="wsl", dataset="digits", max_samples=N,
        epochs=1, batch_size=16, out=str(tmp_path / "run"), plots=False, device="cpu",
        hparam={"T": 2.0},
    )  # fmt: skip
    assert rec["samples"] == N and "test_acc" in rec
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1" in text and "momentum: 0.9" in text  # the CLI's defaults, resolved


@pytest.mark.parametrize("views", ["one", "all", 2, 3])
def test_getitems_equals_getitem(cache_path, views):
    ds = kdcache.CachedDataset(cache_path, seed=1, views=views)
    ds.set_epoch(3)
    idx = [5, 0, 31, 9] + ([95, 94, 40] if views == "all" else [])
    batch = ds.__getitems__(idx)
    for a, b in zip(batch, [ds[i] for i in idx], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert type(a[k]) is type(b[k]), k
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    got = ds.collate(batch)  # the batch as cut = default_collate of its items
    want = torch.utils.data.default_collate([dict(ds[i]) for i in idx])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("collate", ["ds.collate", "default"])
@pytest.mark.parametrize("path", ["ring", "value", "shm"])  # how a worker hands a batch over
def test_collate_is_default_collate_in_one_buffer(cache_path, monkeypatch, collate, path):
    from kdcache.data import handover

    if path != "ring":  # forked workers inherit the settings
        monkeypatch.setattr(handover, "RING_SLOTS", 0)
        monkeypatch.setattr(handover, "PIPE_BYTES", 4 << 20 if path == "value" else 0)
    ds = kdcache.CachedDataset(cache_path, seed=1)
    ds.set_epoch(2)
    idx = [3, 0, 7, 1, 30, 12, 5, 9]
    want = torch.utils.data.default_collate([dict(ds[i]) for i in idx])  # plain dicts
    fn = ds.collate if collate == "ds.collate" else None
    loader = torch.utils.data.DataLoader(ds, sampler=idx, batch_size=8, num_workers=1,
                                         collate_fn=fn)  # fmt: skip
    got = next(iter(loader))  # made in a worker process, handed over in one piece
    assert type(got) is dict and got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    ptrs = {got[k].untyped_storage().data_ptr() for k in got}
    assert len(ptrs) == 1  # one storage: one hand-over per batch
    assert got["input"].untyped_storage().is_shared() == (path == "shm")
    got["input"] += 1  # the user's own writable batch
    items = ds.__getitems__(idx)  # also batches of per-item calls (mixed policies, text)
    for k, v in ds.collate([items[i] for i in range(len(idx))]).items():
        assert torch.equal(v, want[k]), k


def test_imagefolder_items_are_the_teachers_views(tmp_path, make_imagefolder):
    from kdcache.data.datasets import load_dataset

    root = make_imagefolder(n_per_class=4)
    p = kdcache.precompute(
        teacher="resnet8", random_init=0, dataset="imagefolder", data_root=str(root),
        num_augs=2, num_classes=2, out=str(tmp_path / "f.zarr"), device="cpu",
    )  # fmt: skip
    ds = kdcache.CachedDataset(p, seed=2)
    assert len(ds) == 8
    idx = [3, 0, 7]
    for views, shape in (("one", (3, 32, 32)), ("all", (3, 32, 32)), (2, (2, 3, 32, 32))):
        d = kdcache.CachedDataset(p, seed=2, views=views)  # files decoded per row
        for a, b in zip(d.__getitems__(idx), [d[i] for i in idx], strict=True):
            assert torch.equal(a["input"], b["input"]) and torch.equal(a["view"], b["view"])
            assert torch.equal(a["teacher_logits"], b["teacher_logits"]) and a["row"] == b["row"]
            assert a["input"].dtype == torch.uint8 and a["input"].shape == shape
    all_views = kdcache.CachedDataset(p, views="all")
    src = load_dataset("imagefolder", root=str(root), split="train")
    policy = ds.policy
    for row in range(8):  # view 0 is the eval transform of the file
        want = policy.view(src.load(int(ds.rows[row])), policy.identity_params())
        item = all_views[row * 2]
        assert torch.equal(item["input"], want)
        assert torch.equal(item["teacher_logits"], ds.cache.logits(row, 0))


def test_sparse_and_bf16_caches_read_full_width(tmp_path):
    from kdcache.cache.store import open_cache as reader

    common = dict(teacher="resnet8", random_init=0, dataset="digits", max_samples=16,
                  num_augs=2, device="cpu")  # fmt: skip
    for name, extra in (("topk", {"topk": 3}), ("bf16", {"dtype": "bfloat16"})):
        p = kdcache.precompute(**common, **extra, out=str(tmp_path / f"{name}.zarr"))
        c = kdcache.open_cache(p)
        got = c.logits([0, 15], [1, 0])
        assert got.dtype == torch.float32 and got.shape == (2, 10)
        want = reader(p).read(np.array([0, 15]), np.array([1, 0]))
        assert torch.equal(got, torch.from_numpy(want)), name


def test_distributed_sampler_splits_the_items(cache_path):
    ds = kdcache.CachedDataset(cache_path)
    shards = [
        list(torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False))
        for r in (0, 1)
    ]
    assert sorted(shards[0] + shards[1]) == list(range(N))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, sampler=shards[1])))
    assert batch["row"].tolist() == shards[1][:4]


def test_items_of_views_of_several_sizes_stay_items():
    from kdcache.data.handover import Items, collate_items

    a, b = torch.zeros(3, 4, 4, dtype=torch.uint8), torch.ones(3, 5, 5, dtype=torch.uint8)
    items = Items({"input": [a, b], "label": torch.tensor([1, 2]), "row": torch.tensor([7, 9])})
    assert len(items) == 2 and torch.equal(items[1]["input"], b) and items[1]["row"] == 9
    assert items[-1] is items[1] and [it["row"] for it in items] == [7, 9]
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        collate_items(items)  # as default_collate refuses ragged views
    same = Items({"input": torch.stack([a, a]), "label": torch.tensor([1, 2]),
                  "row": torch.tensor([7, 9])})  # fmt: skip
    got = collate_items(same)
    assert torch.equal(got["input"], torch.stack([a, a])) and got["row"].tolist() == [7, 9]
