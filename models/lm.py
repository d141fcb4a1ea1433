"""Causal language models (``hf:PATH`` with an ``AutoModelForCausalLM`` config) as teachers
of token-level caches: detection from the config, loading, the spec's teacher entry."""

from __future__ import annotations

import os

from kdcache.cache.errors import KdcacheError

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _local(path: str) -> str:
    local = os.path.expanduser(path)
    if path.startswith(("/", "./", "../", "~")) or os.path.exists(local):
        if not os.path.isdir(local):
            what = "is not a directory" if os.path.exists(local) else "does not exist"
            raise KdcacheError(
                f"hf:{path}: the directory {local!r} {what}; expected a local directory saved "
                "with save_pretrained (config.json, weights, tokenizer) or a hub id"
            )
        return local
    return path


def hf_config(name: str):
    """The AutoConfig of an ``hf:`` teacher name (KdcacheError when not loadable)."""
    from kdcache.models.hf import _hub
    from transformers import AutoConfig

    path = _local(name[3:])
    return _hub("config", path, lambda: AutoConfig.from_pretrained(path))


def config_is_causal_lm(config) -> bool:
    """A causal LM by its config: an architecture ending in ForCausalLM/LMHeadModel; without
    architectures, ``is_decoder`` or a model_type of the causal-LM auto mapping."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return bool(getattr(config, "is_decoder", False)) or (
        getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def is_causal_lm(name: str) -> bool:
    """Whether a teacher name is an ``hf:`` causal LM (loads only the config)."""
    if not name.startswith("hf:"):
        return False
    return config_is_causal_lm(hf_config(name))


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def load_causal_lm(name: str, max_length: int | None = None):
    """(model in eval mode, tokenizer, teacher info for the spec) of an ``hf:`` causal LM;
    a max_length beyond the model's positions is refused before the weights are loaded."""
    from kdcache.models.hf import _hf_weights_sha256, _hub, load_hf_tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stage 1 has its own bar; errors stay one line
    config = hf_config(name)
    if not config_is_causal_lm(config):
        archs = getattr(config, "architectures", None)
        raise KdcacheError(
            f"teacher {name} is not a causal language model (architectures {archs}, model_type "
            f"{getattr(config, 'model_type', None)!r}); a token cache needs an "
            "AutoModelForCausalLM teacher (e.g. *ForCausalLM, GPT2LMHeadModel)"
        )
    limit = max_positions(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise KdcacheError(
            f"--max-length {max_length} is beyond the teacher's {limit} positions; "
            f"expected <= {limit}"
        )
    path = _local(name[3:])
    tok = load_hf_tokenizer(path)
    net = _hub("model", path, lambda: AutoModelForCausalLM.from_pretrained(path))
    net.eval()
    vocab = int(net.get_output_embeddings().weight.shape[0])
    info = {
        "name": name,
        "source": "hf",
        "arch": type(net).__name__,
        "weights_sha256": _hf_weights_sha256(path, net),
        "vocab_size": vocab,
        "max_positions": max_positions(config),
    }
    return net, tok, info
