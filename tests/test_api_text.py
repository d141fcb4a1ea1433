"""`CachedDataset` on a text cache (token-mask views of a tiny BERT teacher): a batch is
tokenized in one call and masked in one batched replay, and equals its items one by one."""

from __future__ import annotations

import kdcache
import pytest
import torch


@pytest.fixture(scope="module", params=["token-mask", "identity"])
def text_cache(request, tmp_path_factory, tiny_bert_dir, make_text_file) -> str:
    return kdcache.precompute(
        teacher=f"hf:{tiny_bert_dir}", dataset="text", data_root=str(make_text_file(n=24)),
        augment=request.param, num_augs=3, out=str(tmp_path_factory.mktemp("t") / "c.zarr"),
        device="cpu",
    )  # fmt: skip


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "input":
            assert a[k].keys() == b[k].keys()
            for key in a[k]:
                assert torch.equal(a[k][key], b[k][key]), key
        else:
            assert type(a[k]) is type(b[k]) and torch.equal(
                torch.as_tensor(a[k]), torch.as_tensor(b[k])
            ), k


@pytest.mark.parametrize("views", ["one", "all"])
def test_text_batch_equals_its_items(text_cache, views):
    ds = kdcache.CachedDataset(text_cache, seed=5, views=views)
    idx = [7, 0, 23, 3, 11, 19, 4] + ([71, 70, 45] if views == "all" else [])
    lengths, masked = set(), 0
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        batch = ds.__getitems__(idx)
        for i, got in zip(idx, batch, strict=True):
            want = ds[i]
            _equal(got, want)
            ids = got["input"]["input_ids"]
            lengths.add(len(ids))
            row = got["row"]
            plain = ds.collate_text([ds.source.load(int(ds.rows[row]))])[0]
            masked += int((ids != plain).sum())
            assert torch.equal(got["teacher_logits"], ds.cache.logits(row, int(got["view"])))
    assert len(lengths) > 1  # texts of several lengths
    assert (masked > 0) == (ds.policy.name == "token-mask")


def test_text_loader_with_workers_gives_the_padded_batch(text_cache):
    ds = kdcache.CachedDataset(text_cache, seed=1)
    ds.set_epoch(2)
    idx = list(range(24))
    loader = torch.utils.data.DataLoader(
        ds, sampler=idx, batch_size=8, num_workers=2, collate_fn=ds.collate
    )
    for n, got in enumerate(loader):
        items = [ds[i] for i in idx[n * 8 : n * 8 + 8]]
        _equal(got, ds.collate(items))
        rest = torch.utils.data.default_collate([
            {k: v for k, v in it.items() if k != "input"} for it in items
        ])  # fmt: skip
        _equal({**rest, "input": got["input"]}, got)  # what default_collate gives
        ids = got["input"]["input_ids"]
        assert ids.shape == (8, max(len(it["input"]["input_ids"]) for it in items))
        assert ids.shape == got["input"]["attention_mask"].shape
        tensors = [got[k] for k in rest] + list(got["input"].values())
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one hand-over
