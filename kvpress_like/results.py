"""What a call returns: the generated tokens, a compressed context, and the stats of the work."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_like.cache import CompressedCache


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

    def clone(self) -> Context:
        return Context(self.cache.clone(), self.last_logits.clone(), self.stats, self.source)


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated ids per row, up to and including EOS
    texts: list[str] | None  # decoded text per row (None without a tokenizer)
    stats: Stats

    @property
    def text(self) -> str:
        assert self.texts is not None, "no tokenizer: use token_ids"
        return self.texts[0]

    @property
    def ids(self) -> list[int]:
        return self.token_ids[0]
