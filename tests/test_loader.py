"""The loader end to end: worker processes, same bytes for any worker count / batch size /
resume, the teacher's eval view on the original file, class-mixed rows, DDP chunk shares,
text via hfds: with dynamic padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kdcache.cache.store import open_cache

from tests.clitools import cli
from tests.datatools import make_jpeg_folder
from tests.test_precompute import _arrays
from tests.test_precompute import _save_weights as _weights


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), ("a", "b", "c"), per_class=3)


def _precompute(root, out, weights, *extra):
    return cli(
        "precompute", "--teacher", "resnet8", "--weights", weights, "--dataset", "imagefolder",
        "--data-root", root, "--augment", "rrc-flip", "--num-augs", "3", "--chunk-samples", "4",
        "--dtype", "float32", "--out", out, *extra,
    )  # fmt: skip


def test_same_bytes_for_any_workers_batch_size_and_resume(tmp_path, folder):
    w = _weights(tmp_path, "resnet8", 3)
    _precompute(folder, tmp_path / "a.zarr", w, "--workers", "0", "--batch-size", "3")
    _precompute(folder, tmp_path / "b.zarr", w, "--workers", "2", "--batch-size", "8")
    a, b = _arrays(str(tmp_path / "a.zarr")), _arrays(str(tmp_path / "b.zarr"))
    for k in ("view_params", "keys", "labels"):
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-5)
    # resume: un-done one chunk, run again: it is recomputed to the same bytes
    import zarr

    g = zarr.open_group(str(tmp_path / "b.zarr"), mode="r+")
    meta = dict(g.attrs["kdcache"])
    meta["complete"] = False
    g.attrs["kdcache"] = meta
    g["done"][1] = 0
    g["logits"][4:8] = 0
    _precompute(folder, tmp_path / "b.zarr", w, "--workers", "2", "--batch-size", "5")
    np.testing.assert_allclose(_arrays(str(tmp_path / "b.zarr"))["logits"], a["logits"], atol=1e-5)
    # rows are a seeded permutation of the class-sorted folder; keys map rows to files
    keys = list(a["keys"])
    assert sorted(keys) == keys[:0] + sorted(keys) and keys != sorted(keys)
    with open_cache(str(tmp_path / "a.zarr")) as c:
        assert c.spec.dataset["order"] == {"kind": "permutation", "seed": 0}
        assert c.spec.dataset["decode"].startswith("PIL")
        assert c.spec.views["params"]["eval"]["interpolation"] == "bilinear"
    assert (
        "ok"
        in cli("cache", "verify", tmp_path / "a.zarr", "--replay", "--data-root", folder).output
    )


def test_loader_views_identical_across_workers(folder):
    from kdcache.data.datasets import load_dataset
    from kdcache.data.loader import (
        ViewMaker,
        chunk_batches,
        make_policy,
        precompute_loader,
        row_order,
    )

    ds = load_dataset("imagefolder", root=folder)
    info = {"preprocessing": {"input_size": [3, 40, 40], "crop_pct": 0.875,
                              "interpolation": "bicubic"}}  # fmt: skip
    policy = make_policy("rrc-flip", ds, info)
    order, _ = row_order(ds, 5)
    maker = ViewMaker(ds, policy)

    def run(workers, per_batch):
        batches = chunk_batches([(0, 5), (5, 9)], per_batch)
        assert all(max(b) < 5 or min(b) >= 5 for b in batches)  # never straddles a chunk
        out = list(precompute_loader(maker, order, 5, 4, True, batches, workers=workers))
        views = torch.cat([b["views"] for b in out])
        assert views.dtype == torch.uint8 and views.shape == (36, 3, 40, 40)
        return views, np.concatenate([b["params"] for b in out]).reshape(9, 4, -1)

    v0, p0 = run(0, 1)
    v2, p2 = run(2, 3)
    assert torch.equal(v0, v2) and np.array_equal(p0, p2)
    assert (p0[:, 0] == 0).all() and (p0[:, 1:, 2] > 0).all()  # view 0: the eval view


def test_identity_view_logits_match_timm_eval_transform(tmp_path, folder):
    """Cached view-0 logits == the teacher on timm's eval transform of the original file."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    w = _weights(tmp_path, "resnet18", 3)
    out = tmp_path / "r18.zarr"
    cli("precompute", "--teacher", "resnet18", "--weights", w, "--dataset", "imagefolder",
        "--data-root", folder, "--augment", "rrc-flip", "--num-augs", "2", "--max-samples", "4",
        "--out", out)  # fmt: skip
    from kdcache.models.factory import create_model

    net = create_model("resnet18", num_classes=3, weights=w)[0].net.eval()
    assert isinstance(net, timm.models.ResNet)
    tf = create_transform(**resolve_data_config({}, model=net))
    c = open_cache(str(out))
    keys, cached = c.keys(), c.read(np.arange(c.n), np.zeros(c.n, np.int64))
    with torch.no_grad():
        ref = net(torch.stack([tf(Image.open(folder / k).convert("RGB")) for k in keys]))
    np.testing.assert_allclose(cached, ref.numpy(), rtol=2e-3, atol=2e-3)  # float16 storage


def test_chunk_aware_batches_are_class_mixed(tmp_path, make_imagefolder):
    """Class-sorted folder, chunk-aware reading: distinct classes per batch within 10 % of a
    uniform shuffle (in dataset order a chunk is one class: ~4 of 10 per batch)."""
    from kdcache.cache.reader import iter_epoch

    root = make_imagefolder(n_per_class=16, classes=tuple(f"c{i}" for i in range(10)),
                            size=(12, 10))  # fmt: skip
    out = tmp_path / "mix.zarr"
    cli("precompute", "--teacher", "resnet8", "--random-init", "--dataset", "imagefolder",
        "--data-root", root, "--augment", "identity", "--num-augs", "1", "--chunk-samples", "16",
        "--out", out)  # fmt: skip
    c = open_cache(str(out))
    labels = c.labels()
    assert len(set(labels[:16])) > 5  # a chunk holds many classes
    bs, got = 16, []
    for epoch in range(3):
        for s, _, _ in iter_epoch(c, batch_size=bs, seed=0, epoch=epoch, drop_last=True):
            got.append(len(set(labels[s])))
    rng = np.random.default_rng(0)
    uniform = [len(set(rng.permutation(labels)[:bs])) for _ in range(300)]
    assert np.mean(got) >= 0.9 * np.mean(uniform), (np.mean(got), np.mean(uniform))


def test_ddp_ranks_read_only_their_chunks(tmp_path, folder, monkeypatch):
    from kdcache.cache.reader import Cache
    from kdcache.data.datasets import load_dataset
    from kdcache.distill.loop import BatchMaker, epoch_batches
    from kdcache.distill.teachers import CachedTeacher, open_caches

    w = _weights(tmp_path, "resnet8", 3)
    _precompute(folder, tmp_path / "d.zarr", w, "--chunk-samples", "2")
    ds = load_dataset("imagefolder", root=folder)
    seen = {}
    real = Cache.read_chunk_stored
    for rank in range(2):
        reads: list = []

        def counted(self, c, verify=False, reads=reads):
            reads.append(c)
            return real(self, c, verify)

        monkeypatch.setattr(Cache, "read_chunk_stored", counted)
        caches = open_caches([str(tmp_path / "d.zarr")], ds, 3, None)
        teacher = CachedTeacher(caches, "same", "mean-logits", 0)  # over budget: chunk-aware
        make = BatchMaker(ds, teacher_policy(caches[0]), teacher, rank=rank, world_size=2)
        rows = []
        for b in epoch_batches(make, len(ds), 4, 0, 0, "one", 0):
            assert len(b["samples"]) == 2 and b["views"].shape == (2, 3, 32, 32)
            np.testing.assert_array_equal(b["labels"].numpy(), caches[0].labels()[b["samples"]])
            rows += b["samples"].tolist()
        seen[rank] = (set(reads), set(rows))
        monkeypatch.undo()
    assert not seen[0][0] & seen[1][0] and seen[0][0] | seen[1][0] == set(range(5))
    assert not seen[0][1] & seen[1][1]


def teacher_policy(cache):
    from kdcache.data.views import get_policy

    return get_policy(cache.spec.views["policy"], **cache.spec.views["params"])


def _cached_teacher(tmp_path, folder):
    """A permuted rrc-flip cache of `folder` opened for distill: (weights, dataset, caches,
    teacher, the cache's view policy)."""
    from kdcache.data.datasets import load_dataset
    from kdcache.distill.teachers import CachedTeacher, open_caches

    w = _weights(tmp_path, "resnet8", 3)
    _precompute(folder, tmp_path / "t.zarr", w)
    ds = load_dataset("imagefolder", root=folder)
    caches = open_caches([str(tmp_path / "t.zarr")], ds, 3, None)
    teacher = CachedTeacher(caches, "same", "mean-logits", 1 << 30)
    return w, ds, caches, teacher, teacher_policy(caches[0])


def test_distill_replays_rows_through_keys(tmp_path, folder):
    """A permuted cache: the replayed view of row r is the stored view of file keys[r]."""
    from kdcache.distill.loop import BatchMaker

    w, ds, caches, teacher, pol = _cached_teacher(tmp_path, folder)
    rows, augs = np.array([3, 0, 8]), np.array([1, 2, 0])
    b = BatchMaker(ds, pol, teacher, workers=0)(rows, augs, 0)
    keys, params = caches[0].keys(), caches[0].view_params()
    for j, (r, a) in enumerate(zip(rows, augs, strict=True)):
        img = ds.load(ds.keys.index(keys[r]))
        assert torch.equal(b["views"][j], pol.view(img, params[r, a]))
    from kdcache.models.factory import create_model

    model, _ = create_model("resnet8", num_classes=3, weights=w)
    with torch.no_grad():
        live = model.eval()(b["views"]).numpy()
    np.testing.assert_allclose(b["teacher"].numpy(), live, atol=1e-5)


def test_text_hfds_dynamic_padding_and_max_length(tmp_path, tiny_bert_dir, tiny_texts):
    import datasets

    hf = datasets.Dataset.from_dict(
        {"text": [t for t, _ in tiny_texts[:10]], "label": [y for _, y in tiny_texts[:10]]}
    )
    hf.save_to_disk(str(tmp_path / "t"))
    out = tmp_path / "t.zarr"
    cli("precompute", "--teacher", f"hf:{tiny_bert_dir}", "--dataset", f"hfds:{tmp_path / 't'}",
        "--augment", "token-mask", "--num-augs", "2", "--max-length", "6", "--workers", "2",
        "--batch-size", "4", "--out", out)  # fmt: skip
    with open_cache(str(out)) as c:
        assert c.spec.teacher["preprocessing"]["max_length"] == 6 and c.n == 10
        assert np.isfinite(c.read(np.arange(10), np.zeros(10, np.int64))).all()
    assert "ok" in cli("cache", "verify", out, "--replay").output
    run = tmp_path / "run"
    cli("distill", "--student", f"hf:{tiny_bert_dir}", "--loss", "kd", "--cache", out,
        "--dataset", f"hfds:{tmp_path / 't'}", "--test-split", "none", "--epochs", "1",
        "--batch-size", "4", "--optimizer", "adamw", "--no-plots", "--out", run)  # fmt: skip


def test_views_k_decodes_each_sample_once(tmp_path, folder, monkeypatch):
    """--views K: K distinct cached views of one decoded sample, adjacent in the batch."""
    from kdcache.distill.loop import BatchMaker, epoch_batches
    from kdcache.distill.teachers import CachedTeacher

    w, ds, caches, teacher, pol = _cached_teacher(tmp_path, folder)
    loads = []
    real = type(ds).load
    monkeypatch.setattr(type(ds), "load", lambda self, i: loads.append(i) or real(self, i))
    make = BatchMaker(ds, pol, teacher)
    batches = list(epoch_batches(make, len(ds), 6, 0, 0, "3", 0))
    assert [len(b["samples"]) for b in batches] == [6, 6, 6, 6, 3]
    params = caches[0].view_params()
    chunked = CachedTeacher(caches, "same", "mean-logits", 0)  # chunk-aware: groups too
    make2 = BatchMaker(ds, pol, chunked)
    batches2 = list(epoch_batches(make2, len(ds), 6, 0, 0, "3", 0))
    assert sorted(np.concatenate([b["samples"] for b in batches2]).tolist()) == sorted(
        np.repeat(np.arange(9), 3).tolist()
    )
    assert len(loads) == 2 * len(ds)
    loads.clear()
    for b in batches + batches2:
        s, a = b["samples"].reshape(-1, 3), b["augs"].reshape(-1, 3)
        assert (s == s[:, :1]).all() and all(len(set(x)) == 3 for x in a)
        for j, (r, g) in enumerate(zip(b["samples"], b["augs"], strict=True)):
            img = real(ds, ds.keys.index(caches[0].keys()[r]))
            assert torch.equal(b["views"][j], pol.view(img, params[r, g]))


def test_stages_never_import_each_other():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def imports(pkg: str, top_level: bool = False) -> set[str]:
        """Imported names (`kdcache.X...` counts as X); top_level: module-level only."""
        found = set()
        lead = "" if top_level else r"\s*"
        pattern = rf"^{lead}(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))"
        for f in (root / pkg).rglob("*.py"):
            for a, b in re.findall(pattern, f.read_text(), flags=re.M):
                parts = (a or b).split(".")
                found.add(parts[1] if parts[0] == "kdcache" and len(parts) > 1 else parts[0])
        return found

    assert "precompute" not in imports("distill") and "distill" not in imports("precompute")
    for shared in ("data", "models"):
        assert not {"precompute", "distill"} & imports(shared), shared
    assert not {"data", "models", "precompute", "distill"} & imports("cache")
    assert "torch" not in imports("cache", top_level=True)  # lazily, inside a method, only


def test_corrupt_file_in_a_worker_is_one_error_line_nothing_written(tmp_path):
    root = make_jpeg_folder(tmp_path / "f", per_class=2)
    (root / "train/a/001.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "x.zarr"
    res = cli("precompute", "--teacher", "resnet8", "--random-init", "--dataset", "imagefolder",
              "--data-root", root, "--augment", "rrc-flip", "--workers", "2", "--out", out,
              ok=False)  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode image") and "train/a/001.jpg" in last
    assert not out.exists()


def test_hfds_images_and_wds_shards_end_to_end(tmp_path, monkeypatch):
    """The same samples as an HF dataset and as tar shards give the same cache rows."""
    from tests.datatools import hf_image_dataset, image_samples, write_shard

    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "idx"))
    hf_image_dataset(5).save_to_disk(str(tmp_path / "hf"))
    samples = image_samples(5)
    write_shard(tmp_path / "s0.tar", samples[:3])
    write_shard(tmp_path / "s1.tar", samples[3:])
    w = _weights(tmp_path, "resnet8", 3)
    got = {}
    for name, ds in (("hf", f"hfds:{tmp_path / 'hf'}"), ("wds", f"wds:{tmp_path}/s{{0..1}}.tar")):
        out = tmp_path / f"{name}.zarr"
        cli("precompute", "--teacher", "resnet8", "--weights", w, "--dataset", ds,
            "--augment", "rrc-flip", "--num-augs", "2", "--workers", "1", "--out", out)  # fmt: skip
        with open_cache(str(out)) as c:
            got[name] = (c.labels(), c.view_params(), c.read(np.arange(5), np.zeros(5, np.int64)))
        run = tmp_path / f"run-{name}"
        cli("distill", "--student", "resnet8", "--loss", "kd", "--cache", out, "--dataset", ds,
            "--test-split", "none", "--epochs", "1", "--batch-size", "4", "--workers", "1",
            "--no-plots", "--out", run)  # fmt: skip
    # same images in the same sample order: same permutation, same params, same logits
    (la, pa, xa), (lb, pb, xb) = got["hf"], got["wds"]
    assert np.array_equal(la, lb) and np.array_equal(pa, pb)
    np.testing.assert_allclose(xa, xb, atol=1e-3)


def test_key_names_the_source_kind_not_its_location(tmp_path):
    import shutil

    from kdcache.precompute.config import PrecomputeConfig
    from kdcache.precompute.setup import build_setup

    from tests.datatools import hf_image_dataset

    hf_image_dataset(3).save_to_disk(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    specs = [
        build_setup(PrecomputeConfig(teacher="resnet8", random_init=0, out=str(tmp_path / "o"),
                                     dataset=f"hfds:{tmp_path / d}", augment="rrc-flip")).spec
        for d in ("a", "b")
    ]  # fmt: skip
    assert specs[0].key() == specs[1].key() and specs[0].dataset["name"] == "hfds"


def test_torchrun_two_ranks_with_workers_equal_one_process(tmp_path, folder):
    """Native images, rrc-flip, loader workers: world size 2 writes the same bytes."""
    from tests.clitools import torchrun

    w = _weights(tmp_path, "resnet8", 3)
    _precompute(folder, tmp_path / "one.zarr", w, "--workers", "1")
    args = ["precompute", "--teacher", "resnet8", "--weights", w, "--dataset", "imagefolder",
            "--data-root", folder, "--augment", "rrc-flip", "--num-augs", "3",
            "--chunk-samples", "4", "--dtype", "float32", "--workers", "1",
            "--out", tmp_path / "two.zarr"]  # fmt: skip
    p = torchrun(2, *args)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = _arrays(str(tmp_path / "one.zarr")), _arrays(str(tmp_path / "two.zarr"))
    for k in ("view_params", "keys", "labels"):
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-5)
