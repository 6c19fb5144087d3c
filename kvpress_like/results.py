"""What a call returns: the generated tokens, a compressed context, and the stats of the work."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache
from kvpress_like.errors import ConfigError
from kvpress_like.identity import describe_tokenizer

if TYPE_CHECKING:
    from kvpress_like.pipeline import Pipeline


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
    source: dict[str, str]  # what made it, compared with the pipeline it is given to
    # [B, T] long: the prompt's ids, padded (left, and between a context and its continuation);
    # logits processors read each row's ids right-aligned (generation.decode_loop)
    ids: torch.Tensor
    valid: torch.Tensor  # [B, T] bool: False for padding
    # model and tokenizer identity (``identity.py``) and the strategy, as a saved file records them
    origin: dict[str, Any] = field(default_factory=dict)

    def clone(self) -> Context:
        return replace(self, cache=self.cache.clone(), last_logits=self.last_logits.clone())

    def to(self, device: torch.device | str) -> Context:
        """A copy on ``device`` (a pipeline takes contexts on its model's device)."""
        logits = self.last_logits.to(device)  # its device is explicit: "cuda" becomes "cuda:0"
        device = logits.device
        return replace(
            self,
            cache=self.cache.to(device),
            last_logits=logits,
            ids=self.ids.to(device),
            valid=self.valid.to(device),
            source={**self.source, "device": str(device)},
        )

    def save(self, path: str | Path) -> Path:
        """Write to a ``.safetensors`` file (``docs/contexts.md``): atomically, so an interrupted
        write leaves no file at ``path``. Returns the path."""
        from kvpress_like.context_file import save_context

        return save_context(self, path)

    @classmethod
    def load(cls, path: str | Path, pipe: Pipeline, device: torch.device | str | None = None) -> Context:
        """Read a saved context for ``pipe`` (which may use another strategy), on ``device``
        (default: the pipeline's). The file is checked whole (checksum, model and tokenizer
        identity, every tensor) before anything is returned; a bad one raises ContextFileError."""
        from kvpress_like.context_file import load_context

        return load_context(path, pipe, device)


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


def context_source(adapter: ModelAdapter, model: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, str]:
    """What a context records of the pipeline that made it, readable: the model (family, name,
    config hash, weights fingerprint; ``identity.py``), the cache's shape, dtype and device, and
    the tokenizer (class, name, size, vocabulary hash)."""
    info = adapter.info
    name = model["name_or_path"] or "(unnamed)"
    return {
        "model": f"{adapter.config.model_type} {name} (config {model['config_hash']}, "
        f"weights {model['weights_fingerprint']})",
        "cache shape": f"{info.num_layers} layers x {info.num_kv_heads} KV heads x {adapter.head_dim}",
        "dtype": str(adapter.dtype),
        "device": str(adapter.device),
        "tokenizer": describe_tokenizer(tokenizer),
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
