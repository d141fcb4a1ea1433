"""One factory for teachers and students: timm, torchvision (``tv:``), Hugging Face (``hf:``)
and the CIFAR zoo of the KD literature, all returning ``(model, info)``.

Image models take float ``(B,3,H,W)`` in ``[0,1]`` and normalize inside with the mean/std
resolved from the model itself, so a cache's views never depend on a caller's normalization.
Text models take ``(input_ids, attention_mask)`` and return logits.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch
from kdcache.cache.errors import KdcacheError
from kdcache.models.sources import (  # noqa: F401 - MODEL_SOURCES re-exported (kdcache list)
    _BUILDERS,
    _PREPROCESSORS,
    MODEL_SOURCES,
    model_source,
)
from kdcache.models.weights import (
    first_line,
    load_weights_into,
    num_outputs,
    read_weights,
    state_dict_sha256,
)
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TEXT_MAX_LENGTH = 128


class Normalized(nn.Module):
    """``net((x - mean) / std)``; mean/std are non-persistent so state dicts equal the net's
    (prefixed ``net.``)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # views travel as uint8; float conversion on the device
            x = x.to(self.mean.dtype).div_(255.0)
        return self.net((x - self.mean) / self.std)


class TextClassifier(nn.Module):
    """Hugging Face sequence classifier whose forward returns the logits tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    init_seed: int | None = None,
    **kw,
) -> tuple[nn.Module, dict]:
    """Build a model by prefixed name; see the module docstring and ``info`` keys below.

    ``info``: name, source (timm|torchvision|hf|cifar), arch, num_classes, weights_sha256
    (sha256 of ``weights`` file; for library-pretrained weights a sha256 of the loaded
    tensors; None for random init), weights_origin (see ``weights_origin``), preprocessing,
    modality (image|text).
    ``init_seed``: a random init drawn from this seed (reproducible, unlike the global RNG).
    Extra kw: ``model_kwargs`` (dict forwarded to the library builder), ``max_length`` (hf).
    """
    if sum(map(bool, (pretrained, weights, init_seed is not None))) > 1:
        raise KdcacheError("give one of --pretrained, --weights PATH or --random-init, not several")
    state = read_weights(weights) if weights else None
    source = model_source(name)
    if source == "hf:":
        from kdcache.models.hf import create_hf_model

        if init_seed is not None:
            raise KdcacheError(f"{name!r} is loaded with from_pretrained; it has no random init")
        model, info = create_hf_model(name, name[3:], num_classes, state, weights, kw)
        info["weights_origin"] = weights_origin(info, weights, True, None)
        return model, info
    if init_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            return _create(name, source, num_classes, pretrained, state, weights, init_seed, kw)
    return _create(name, source, num_classes, pretrained, state, weights, init_seed, kw)


def weights_origin(
    info: dict, weights: str | None, pretrained: bool, init_seed: int | None
) -> dict:
    """Where a model's weights came from, for humans (`cache ls/info`): a file (name +
    sha256), library-pretrained weights (tag), a seeded random init, or an unseeded one."""
    if weights:
        import os

        return {"kind": "file", "name": os.path.basename(str(weights).rstrip("/")),
                "sha256": info.get("weights_sha256")}  # fmt: skip
    if pretrained:
        return {"kind": "pretrained", "tag": info.get("pretrained_tag") or info.get("name"),
                "sha256": info.get("weights_sha256")}  # fmt: skip
    if init_seed is not None:
        return {"kind": "random-init", "seed": int(init_seed)}
    return {"kind": "random", "seed": None}


def _create(name, source_key, num_classes, pretrained, state, weights, init_seed, kw):
    """create_model for timm, torchvision and the CIFAR zoo."""
    source, arch = MODEL_SOURCES[source_key].resolve(name)
    model_kwargs = dict(kw.get("model_kwargs") or {})
    builder = _BUILDERS[source]

    def build(n: int | None, pre: bool) -> nn.Module:
        return builder(arch, n, pre, model_kwargs)

    if pretrained:
        net = _hub_call(name, lambda: build(num_classes, True))
        sha = state_dict_sha256(net.state_dict())
    else:
        net = build(num_classes, False)
        sha = None
    if state is not None:
        net = load_weights_into(net, state, num_classes, lambda n: build(n, False), weights)
        sha = state.sha256
    preprocessing = _PREPROCESSORS[source](net, arch)
    model = Normalized(net, preprocessing["mean"], preprocessing["std"])
    info = {
        "name": name,
        "source": source,
        "arch": arch,
        "num_classes": num_outputs(net),
        "weights_sha256": sha,
        "preprocessing": preprocessing,
        "modality": "image",
    }
    if pretrained:
        cfg = getattr(net, "pretrained_cfg", None) or {}
        tag = cfg.get("tag") if isinstance(cfg, dict) else None
        info["pretrained_tag"] = f"{arch}.{tag}" if tag else arch
    info["weights_origin"] = weights_origin(info, weights, pretrained, init_seed)
    return model, info


def load_tokenizer(info: dict):
    """The tokenizer of a text model's info: the files stored in its cache when given
    (``tokenizer_files``, from ``Cache.tokenizer_files()``: a pulled cache is
    self-contained), else ``preprocessing.tokenizer`` (a local path or hub id)."""
    from kdcache.models.hf import load_hf_tokenizer, tokenizer_from_files

    if info.get("modality") != "text":
        raise KdcacheError(f"model {info.get('name')!r} is not a text model; it has no tokenizer")
    if info.get("tokenizer_files"):
        return tokenizer_from_files(info["tokenizer_files"], f"the cache of {info.get('name')}")
    return load_hf_tokenizer(info["preprocessing"]["tokenizer"])


def check_vocab(student: dict, tok, teacher: str) -> None:
    """A text student must embed every token id of the cache's tokenizer (the replayed views
    are those ids); otherwise one error naming both sizes instead of an IndexError."""
    from kdcache.models.hf import vocab_size

    have, need = int(student.get("vocab_size") or 0), vocab_size(tok)
    if have and need > have:
        raise KdcacheError(
            f"student {student.get('name')!r} has a vocabulary of {have} tokens but the "
            f"tokenizer of teacher {teacher!r} (stored in the cache) has {need}; use a student "
            "built on the teacher's tokenizer"
        )


def model_input_size(info: dict) -> tuple[int, ...]:
    """``(H, W)`` for image models, ``(max_length,)`` for text models."""
    pre = info["preprocessing"]
    if info.get("modality") == "text":
        return (int(pre["max_length"]),)
    return tuple(int(v) for v in pre["input_size"][1:])


class _HeldDownloadLine:
    """stdout/stderr while a hub library loads weights. torch prints `Downloading: "URL" to
    PATH` (to stdout) before it connects; that line is held until the download shows progress
    (then written, in order) and dropped when loading fails, so offline the `error:` line is
    the only output."""

    def __init__(self, stream, peers: list) -> None:
        self.stream, self.held, self.peers = stream, "", peers
        peers.append(self)

    def write(self, text: str) -> int:
        if text.startswith("Downloading: ") and not self.held:
            self.held = text
            return len(text)
        for p in self.peers:  # progress on either stream: the download is running
            p.release()
        return self.stream.write(text)

    def release(self) -> None:
        if self.held:
            self.stream.write(self.held)
            self.held = ""

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _hub_call(name: str, fn: Callable[[], nn.Module]) -> nn.Module:
    """Run a library's pretrained download; offline failures become one-line KdcacheErrors."""
    streams = sys.stdout, sys.stderr
    held: list = []
    sys.stdout, sys.stderr = (_HeldDownloadLine(s, held) for s in streams)
    try:
        out = fn()
        for h in held:
            h.release()
        return out
    except KdcacheError:
        raise
    except Exception as e:  # noqa: BLE001 - hub libraries raise many network error types
        raise KdcacheError(
            f"cannot load pretrained weights for {name!r} ({type(e).__name__}: "
            f"{first_line(e)[:200]}); offline? pass --weights PATH or fill the hub cache first"
        ) from e
    finally:
        sys.stdout, sys.stderr = streams


# ----------------------------------------------------------------------------- builders
