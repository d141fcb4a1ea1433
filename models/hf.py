"""Hugging Face sequence classifiers for ``create_model("hf:PATH_OR_ID")``.

An ``hf:`` name always means trained weights (``from_pretrained``): a local directory or a hub
id. A checkpoint without a classification head (e.g. a bare ``bert-base-uncased``) gets a fresh
head of ``num_classes`` outputs; one with a head must agree with ``num_classes``.
"""

from __future__ import annotations

import glob
import hashlib
import os

from kdcache.cache.errors import KdcacheError
from kdcache.models.factory import DEFAULT_TEXT_MAX_LENGTH, TextClassifier
from kdcache.models.weights import (
    WeightsFile,
    first_line,
    load_weights_into,
    sha256_file,
    state_dict_sha256,
)
from torch import nn

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def _hub(what: str, path: str, fn):
    try:
        return fn()
    except KdcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise KdcacheError(
            f"cannot load Hugging Face {what} {path!r} ({type(e).__name__}: "
            f"{first_line(e)[:200]}); offline? pass a local directory saved with save_pretrained"
        ) from e


def create_hf_model(
    name: str,
    path: str,
    num_classes: int | None,
    state: WeightsFile | None,
    weights: str | None,
    kw: dict,
) -> tuple[nn.Module, dict]:
    """Load ``AutoModelForSequenceClassification`` and wrap it as ``TextClassifier``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not path:
        raise KdcacheError("hf: needs a path or hub id, e.g. hf:bert-base-uncased or hf:./my_bert")
    local = os.path.expanduser(path)
    if path.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(local):
        if not os.path.isdir(local):
            what = "is not a directory" if os.path.exists(local) else "does not exist"
            raise KdcacheError(
                f"hf:{path}: the directory {local!r} {what}; expected a local directory saved "
                "with save_pretrained (config.json, weights, tokenizer) or a hub id"
            )
        path = local
    config = _hub("config", path, lambda: AutoConfig.from_pretrained(path))
    archs = getattr(config, "architectures", None) or []
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if has_head and num_classes is not None and num_classes != config.num_labels:
        raise KdcacheError(
            f"--num-classes {num_classes} but {path!r} has a {config.num_labels}-class classifier"
        )
    extra = {} if has_head or num_classes is None else {"num_labels": num_classes}
    net = _hub(
        "model",
        path,
        lambda: AutoModelForSequenceClassification.from_pretrained(
            path, **extra, **(kw.get("model_kwargs") or {})
        ),
    )
    sha = _hf_weights_sha256(path, net)
    if state is not None:

        def rebuild(n: int) -> nn.Module:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=n)

        net = load_weights_into(net, state, num_classes, rebuild, weights)
        sha = state.sha256
    limit = getattr(net.config, "max_position_embeddings", None) or 512
    max_length = int(kw.get("max_length") or min(DEFAULT_TEXT_MAX_LENGTH, limit))
    if max_length > limit:
        raise KdcacheError(f"max_length={max_length} exceeds the model's limit {limit}")
    info = {
        "name": name,
        "source": "hf",
        "arch": path,
        "num_classes": int(net.config.num_labels),
        "weights_sha256": sha,
        "preprocessing": {"tokenizer": path, "max_length": max_length},
        "modality": "text",
        "vocab_size": int(getattr(net.config, "vocab_size", 0) or 0),
    }
    return TextClassifier(net), info


def load_hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return _hub("tokenizer", path, lambda: AutoTokenizer.from_pretrained(path))


def tokenizer_files(tok) -> dict[str, bytes]:
    """A tokenizer as its save_pretrained files (name -> bytes), to store inside a cache."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kdcache-tok-") as d:
        tok.save_pretrained(d)
        out = {}
        for name in sorted(os.listdir(d)):
            full = os.path.join(d, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    out[name] = f.read()
    return out


def tokenizer_from_files(files: dict[str, bytes], where: str):
    """Rebuild a tokenizer from files stored in a cache; the names were checked to be plain
    names when they were read (cache.blobs), so they are written only inside a temp dir."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="kdcache-tok-") as d:
        for name, data in files.items():
            if os.path.basename(name) != name or name in (".", ".."):
                raise KdcacheError(f"{where}: tokenizer file {name!r} is not a plain name")
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        return _hub("tokenizer stored in", where, lambda: AutoTokenizer.from_pretrained(d))


def vocab_size(tok) -> int:
    """Token ids a tokenizer can emit (its base vocabulary plus added tokens)."""
    return int(len(tok))


def _hf_weights_sha256(path: str, net: nn.Module) -> str:
    """sha256 of the weight file (several files: of their names + hashes); tensors as fallback."""
    local = path if os.path.isdir(path) else None
    if local is None:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local hub cache
            local = None
    files: list[str] = []
    if local:
        for pattern in _WEIGHT_PATTERNS:
            files = sorted(glob.glob(os.path.join(local, pattern)))
            if files:
                break
    if not files:
        return state_dict_sha256(net.state_dict())
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.basename(f)}:{sha256_file(f)}\n".encode())
    return h.hexdigest()
