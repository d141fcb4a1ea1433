"""Model factory: timm / torchvision / CIFAR zoo / Hugging Face, weights and offline errors."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
from kdcache.cache.errors import KdcacheError
from kdcache.data.views import get_policy, tokenize_texts
from kdcache.models.factory import create_model, load_tokenizer, model_input_size
from kdcache.models.weights import state_dict_sha256


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_timm_resnet34_forward():
    model, info = create_model("resnet34", num_classes=5)
    assert info["source"] == "timm" and info["num_classes"] == 5 and info["modality"] == "image"
    pre = info["preprocessing"]
    assert pre["input_size"] == [3, 224, 224] and len(pre["mean"]) == 3 and pre["interpolation"]
    assert info["weights_sha256"] is None
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_cifar_zoo_takes_precedence_and_param_counts():
    m8, info = create_model("resnet8", num_classes=100)
    assert info["source"] == "cifar" and model_input_size(info) == (32, 32)
    # RepDistiller's resnet8: 83,892 params with 100 classes, 78,042 with 10
    assert _count(m8) == 83_892
    assert _count(create_model("resnet8", num_classes=10)[0]) == 78_042
    assert 7.3e6 < _count(create_model("resnet32x4")[0]) < 7.5e6
    with torch.no_grad():
        for name in ("resnet8x4", "wrn_16_2"):
            model, info = create_model(name, num_classes=10)
            assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert info["preprocessing"]["mean"][0] == pytest.approx(0.5071)


def test_torchvision_resnet18_forward():
    model, info = create_model("tv:resnet18", num_classes=3)
    assert info["source"] == "torchvision" and info["preprocessing"]["input_size"] == [3, 224, 224]
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_names():
    with pytest.raises(KdcacheError, match="tv:NAME"):
        create_model("definitely_not_a_model")
    with pytest.raises(KdcacheError, match="torchvision"):
        create_model("tv:not_a_tv_model")


def test_weights_round_trip(tmp_path):
    model, _ = create_model("resnet8", num_classes=7)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": model.state_dict(), "config": {"student": "resnet8"}}, wrapped)
    bare = tmp_path / "bare.pt"
    torch.save(model.net.state_dict(), bare)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        for path in (wrapped, bare):
            loaded, info = create_model("resnet8", weights=str(path))  # classes from checkpoint
            assert info["num_classes"] == 7
            sd = torch.load(path, weights_only=True)
            assert info["weights_sha256"] == state_dict_sha256(sd.get("model", sd))
            torch.testing.assert_close(loaded.eval()(x), ref)
    with pytest.raises(KdcacheError, match=r"--num-classes 10.*7-class"):
        create_model("resnet8", num_classes=10, weights=str(wrapped))
    with pytest.raises(KdcacheError, match="do not fit"):
        create_model("resnet14", weights=str(bare))
    with pytest.raises(KdcacheError, match="not found"):
        create_model("resnet8", weights=str(tmp_path / "missing.pt"))


def test_timm_weights_infer_classes(tmp_path):
    model, _ = create_model("resnet18", num_classes=4)
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    _, info = create_model("resnet18", weights=str(path))
    assert info["num_classes"] == 4


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(KdcacheError, match="cannot load pretrained weights for 'resnet18'"):
        create_model("resnet18", pretrained=True)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(KdcacheError, match=r"tv:resnet18.*URLError"):
        create_model("tv:resnet18", pretrained=True)
    with pytest.raises(KdcacheError, match="fake-org/fake-model"):
        create_model("hf:fake-org/fake-model")
    with pytest.raises(KdcacheError, match="no downloadable weights"):
        create_model("resnet20", pretrained=True)


def test_weights_key_is_the_tensors_not_the_checkpoint_file(tmp_path):
    """Same weights in checkpoints of different runs (other out path, timings) -> same
    weights_sha256 (so the same cache key); other weights -> another; same again."""
    torch.manual_seed(0)
    model, _ = create_model("resnet8", num_classes=3)
    sd = model.state_dict()
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save({"model": sd, "config": {"out": "runs/x"}, "record": {"epoch_seconds": 1.5}}, a)
    torch.save({"model": sd, "config": {"out": "/elsewhere"}, "record": {"epoch_seconds": 9.0}}, b)
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"model": other, "config": {"out": "runs/x"}}, c)
    assert a.read_bytes() != b.read_bytes()
    sha = {p: create_model("resnet8", weights=str(p))[1]["weights_sha256"] for p in (a, b, c)}
    assert sha[a] == sha[b] == state_dict_sha256(sd)
    assert sha[c] != sha[a]


def test_pretrained_from_the_local_hub_cache_is_keyed_by_its_tensors(monkeypatch, tmp_path):
    """`--pretrained` as on a machine whose torch hub cache holds the file (no network): the
    weights load and their sha256 covers every tensor, BatchNorm's 0-dim counters included."""
    import os

    import torchvision

    torch.hub.set_dir(str(tmp_path / "hub"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "hub" / "checkpoints" / os.path.basename(url))
    model, info = create_model("tv:resnet18", pretrained=True)
    assert info["weights_sha256"] == state_dict_sha256(sd) and info["num_classes"] == 1000
    torch.testing.assert_close(model.net.conv1.weight, sd["conv1.weight"])


def test_hf_tiny_bert(tiny_bert_dir, tiny_texts, tmp_path):
    model, info = create_model(f"hf:{tiny_bert_dir}", max_length=16)
    assert info["source"] == "hf" and info["modality"] == "text" and info["num_classes"] == 3
    assert info["preprocessing"] == {"tokenizer": str(tiny_bert_dir), "max_length": 16}
    st = tiny_bert_dir / "model.safetensors"
    assert info["weights_sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    tok = load_tokenizer(info)
    ids = tokenize_texts(tok, [t for t, _ in tiny_texts[:4]], 16)
    inputs = get_policy("identity").apply(ids)
    with torch.no_grad():
        logits = model.eval()(**inputs)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    with pytest.raises(KdcacheError, match="--num-classes 5.*3-class"):
        create_model(f"hf:{tiny_bert_dir}", num_classes=5)
    path = tmp_path / "bert.pt"
    torch.save({"model": model.state_dict()}, path)
    again, info2 = create_model(f"hf:{tiny_bert_dir}", weights=str(path), max_length=16)
    assert info2["weights_sha256"] == state_dict_sha256(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**inputs), logits)
