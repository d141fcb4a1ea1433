"""Causal-LM students for ``distill`` on token caches: ``hf:DIR`` (a directory saved with
``save_pretrained``: its weights, or a fresh init when it holds only ``config.json``) or
``hf:FILE.json`` (a config: a fresh, seeded init). The directory's tokenizer, when it has one,
must be the cache's teacher's (checked by the caller)."""

from __future__ import annotations

import glob
import os

from kdcache.cache.errors import KdcacheError
from torch import nn

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class CausalLM(nn.Module):
    """A Hugging Face causal LM whose forward returns the (B, L, V) logits tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids, attention_mask=None):
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def _is_causal(config) -> bool:
    from transformers import AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return True
    return type(config) in AutoModelForCausalLM._model_mapping


def is_causal_lm(name: str) -> bool:
    """Whether ``name`` is an ``hf:`` path whose config is a causal LM (cheap: the config)."""
    if not name.startswith("hf:"):
        return False
    path = os.path.expanduser(name[3:])
    cfg_file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return False
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg_file if path.endswith(".json") else path)
    except Exception:  # noqa: BLE001 - not a config we can read: not ours to decide
        return False
    return _is_causal(config)


def create_lm_student(name: str) -> tuple[CausalLM, dict]:
    """Build the student; ``info``: name, vocab_size, max_positions, tokenizer_dir (or None),
    init ("pretrained" | "config")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.expanduser(name[3:]) if name.startswith("hf:") else ""
    if not path or not os.path.exists(path):
        raise KdcacheError(
            f"--student {name!r}: expected hf:DIR (saved with save_pretrained, or holding a "
            "config.json) or hf:CONFIG.json for a language-model student"
        )
    is_file = os.path.isfile(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise KdcacheError(f"--student {name!r}: cannot read its config ({e})") from None
    if not _is_causal(config):
        raise KdcacheError(
            f"--student {name!r} is a {type(config).__name__}, not a causal language model; "
            "a token cache trains causal-LM students (e.g. GPT2LMHeadModel)"
        )
    has_weights = not is_file and any(glob.glob(os.path.join(path, p)) for p in _WEIGHTS)
    if has_weights:
        net = AutoModelForCausalLM.from_pretrained(path)
    else:  # a fresh init drawn from the run's seed (torch.manual_seed before this call)
        net = AutoModelForCausalLM.from_config(config)
    tok_dir = None
    if not is_file and any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        tok_dir = path
    info = {
        "name": name,
        "vocab_size": int(config.vocab_size),
        "max_positions": _max_positions(config),
        "tokenizer_dir": tok_dir,
        "init": "pretrained" if has_weights else "config",
        "model_type": config.model_type,
    }
    return CausalLM(net), info


def _max_positions(config) -> int | None:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def same_tokenizer(a, b) -> str | None:
    """None when two tokenizers map the same strings to the same ids; else why not."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"{len(va)} vs {len(vb)} tokens"
    differ = sum(1 for t, i in va.items() if vb.get(t) != i)
    if differ:
        return f"{differ} of {len(va)} tokens have other ids"
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} {getattr(a, attr, None)} vs {getattr(b, attr, None)}"
    return None
