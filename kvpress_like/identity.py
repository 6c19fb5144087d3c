"""What identifies a model and a tokenizer for a compressed context: a cache made by one is
meaningless to another, so contexts (in memory and on disk) record these and are refused elsewhere.

- model: a hash of the config fields that shape the cache or give its entries their meaning (layers,
  heads, head size, RoPE, windows, vocabulary, dtype), plus a fingerprint of the weights, so a
  fine-tune of the same architecture is told apart;
- tokenizer: a hash of the vocabulary (token -> id) and of the special tokens.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from kvpress_like.parallel import local_shard

# Config fields a compressed cache depends on; a missing field is recorded as None.
CACHE_SHAPING_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "sliding_window",
    "layer_types",
    "max_position_embeddings",
)
FINGERPRINT_VALUES = 64  # weight values per sampled tensor


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_shaping_config(model: Any) -> dict[str, Any]:
    """The config fields a cache depends on, and the weights' dtype, as JSON-able values."""
    config = model.config
    fields = {name: getattr(config, name, None) for name in CACHE_SHAPING_FIELDS}
    fields["dtype"] = str(model.get_input_embeddings().weight.dtype)
    return json.loads(json.dumps(fields, default=str))


def weights_fingerprint(model: Any) -> str:
    """A hash of a few values of the embedding, of every decoder layer's first weight, of the final
    norm and of the output head: the same on every device, different for other weights. One
    device-to-host copy. A weight sharded over ranks contributes this rank's shard (no
    communication): a tensor-parallel rank's fingerprint is its own."""
    base = model.model
    tensors = [model.get_input_embeddings().weight, base.norm.weight, model.get_output_embeddings().weight]
    tensors += [next(layer.parameters()) for layer in base.layers]
    local = [local_shard(t) for t in tensors]
    samples = torch.cat([t.detach().reshape(-1)[:FINGERPRINT_VALUES].float() for t in local])
    return hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest()[:16]


def model_identity(model: Any) -> dict[str, Any]:
    config = cache_shaping_config(model)
    return {
        "name_or_path": getattr(model.config, "name_or_path", "") or "",
        "config_hash": _digest(config),
        "weights_fingerprint": weights_fingerprint(model),
        "config": config,
    }


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Class, name, size and a hash of the vocabulary and special tokens (not of the class: one
    vocabulary may load as a fast or a model-specific class). A tokenizer without ``get_vocab`` is
    identified by its class and size only."""
    if tokenizer is None:
        return {"class": "None", "name_or_path": "", "size": 0, "vocab_hash": ""}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    special = getattr(tokenizer, "special_tokens_map", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else len(vocab or ())
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "size": size,
        "vocab_hash": _digest(
            [sorted(vocab.items()), special] if vocab else [type(tokenizer).__name__, size]
        ),
    }


def describe_tokenizer(identity: dict[str, Any]) -> str:
    """A tokenizer identity, readable: class, name, size and vocabulary hash (``none`` for None)."""
    if identity["class"] == "None":
        return "none"
    return (
        f"{identity['class']} {identity['name_or_path']} ({identity['size']} tokens, "
        f"vocabulary {identity['vocab_hash']})"
    )


def origin(model: Any, tokenizer: Any, strategy: Any) -> dict[str, Any]:
    """What a context records of the pipeline that made it: model and tokenizer identity, and the
    strategy's name and settings."""
    kind = type(strategy)
    return {
        "model": model_identity(model),
        "tokenizer": tokenizer_identity(tokenizer),
        "strategy": {
            "name": getattr(kind, "name", kind.__name__),
            "settings": strategy.config.model_dump(mode="json"),
        },
    }
