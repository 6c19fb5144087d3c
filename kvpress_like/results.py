"""What a call returns: the generated tokens, a compressed context, and the stats of the work."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

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
