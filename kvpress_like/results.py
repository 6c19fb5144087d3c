"""What a call returns: the generated tokens, a compressed context, and the stats of the work."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache
from kvpress_like.errors import ConfigError


@dataclass
class Stats:
    """What one call did. Per-layer lists are ``[layer][row]``."""

    prompt_tokens: list[int]
    tokens_per_layer: list[list[int]]  # tokens each layer ran on in prefill
    kv_kept_per_layer: list[list[float]]  # KV entries kept per KV head after prefill
    cache_bytes_full: int  # K/V bytes a full cache of every token so far would take
    cache_bytes_kept: int  # K/V bytes actually kept
    prefill_seconds: float
    decode_seconds_per_token: float = 0.0  # median over the decode steps
    decode_step_seconds: tuple[float, ...] = ()
    new_tokens: tuple[int, ...] = ()


@dataclass
class Context:
    """A prefilled (compressed) prompt: continue from it with ``Pipeline.generate(context=...)``."""

    cache: CompressedCache
    last_logits: torch.Tensor  # [B, V] float: logits for the token after the prompt
    stats: Stats
    source: dict[str, str]  # what made it: the model's cache-shaping facts and the tokenizer
    ids: torch.Tensor  # [B, T] long: the prompt's ids, left-padded (what logits processors read)
    valid: torch.Tensor  # [B, T] bool: False for padding

    def clone(self) -> Context:
        return replace(self, cache=self.cache.clone(), last_logits=self.last_logits.clone())


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated ids per row, up to and including EOS or a stop string
    texts: list[str] | None  # decoded text per row (None without a tokenizer)
    stats: Stats
    # output_scores=True: the processed scores [B, V] of every step, as transformers returns them
    scores: tuple[torch.Tensor, ...] | None = None

    @property
    def text(self) -> str:
        if self.texts is None:
            raise ConfigError("text: needs a tokenizer (got None); pass tokenizer= or read token_ids")
        return self.texts[0]

    @property
    def ids(self) -> list[int]:
        return self.token_ids[0]


def context_source(adapter: ModelAdapter, tokenizer: Any) -> dict[str, str]:
    """What a context records of the pipeline that made it: the facts that shape its cache (model
    family and name, layers, KV heads, head size, dtype, device) and the tokenizer."""
    name = getattr(adapter.config, "name_or_path", "") or "(unnamed)"
    info = adapter.info
    if tokenizer is None:
        tokens = "none"
    else:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else "?"
        tokens = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')} ({size} tokens)"
    return {
        "model": f"{adapter.config.model_type} {name}",
        "cache shape": f"{info.num_layers} layers x {info.num_kv_heads} KV heads x {adapter.head_dim}",
        "dtype": str(adapter.dtype),
        "device": str(adapter.device),
        "tokenizer": tokens,
    }


def check_context(context: Any, source: dict[str, str]) -> None:
    """Refuse a context that is no Context, or that another model or tokenizer made."""
    if not isinstance(context, Context):
        raise ConfigError(f"context: must be a Context from Pipeline.compress (got {type(context).__name__})")
    differs = [
        f"{key} is {context.source.get(key)!r}, here {value!r}"
        for key, value in source.items()
        if context.source.get(key) != value
    ]
    if differs:
        raise ConfigError(
            f"context: must come from this pipeline's model and tokenizer; {'; '.join(differs)}"
        )
