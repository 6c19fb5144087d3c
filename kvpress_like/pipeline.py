"""``pipeline(model, strategy="fastkv", **settings)``: one request, top to bottom.

encode      text or ids -> left-padded ids, valid mask, true positions
prefill     embed -> every decoder layer (attention routed to ``_Forward.attend``, which asks
            the strategy's hooks ``score`` / ``retain`` / ``propagate``) -> last position's logits
extend      (questions on a compressed context) the same loop, nothing compressed
decode      one token at a time at true positions (prompt length + step), until EOS or the limit
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pluggy
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvpress_like import flash
from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache, LayerCache
from kvpress_like.config import GenerationConfig, load_config
from kvpress_like.decode import StaticDecoder, capacity_bucket
from kvpress_like.errors import ConfigError, config_error_from
from kvpress_like.hookspecs import LayerView
from kvpress_like.plugins import Strategy, make_plugin_manager, strategy_config

# cuDNN's fused attention is the fastest causal prefill kernel on Hopper (DESIGN.md), then flash.
PREFILL_KERNELS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

# Static decoders (buffers + captured step) kept per pipeline for reuse; the least recently used
# goes first, so a server seeing many prompt lengths does not hold a static cache for each.
KEPT_DECODERS = 4

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


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

    def clone(self) -> Context:
        return Context(self.cache.clone(), self.last_logits.clone(), self.stats)


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


class _Forward:
    """State of one forward pass over the layers; transformers' attention calls ``attend``."""

    def __init__(
        self,
        cache: CompressedCache,
        positions: torch.Tensor,
        valid: torch.Tensor,
        hooks: pluggy.HookRelay | None,
        contiguous: bool = True,
        chunk: int | None = None,
    ) -> None:
        self.cache, self.hooks = cache, hooks
        self.positions, self.valid = positions, valid  # [B, T] of the tokens now in flight
        self.all_valid = bool(valid.all())
        self.contiguous = contiguous  # no token dropped: an index distance is a position distance
        self.propagated: torch.Tensor | None = None  # [B, T] bool, set by the propagate hook
        self.restart = False  # set by the restart hook: prefill again on the propagated tokens
        self.tokens_per_layer: list[torch.Tensor] = []
        self.chunk = chunk  # tokens per chunk of a chunked prefill layer (None: whole layers)
        self.in_flight: slice | None = None  # the chunk of tokens now in the layer
        self.gathered: tuple[Tensor, Tensor, Tensor | None] | None = None  # its keys, values, queries

    def runs_in_chunks(self, layer_idx: int, layer_type: str, seq: int) -> bool:
        """Whether this layer runs in chunks: a fresh full-attention layer longer than a chunk, in
        an unpadded batch (causal by index then equals causal by position)."""
        return (
            self.chunk is not None
            and seq > self.chunk
            and layer_type == "full_attention"
            and self.all_valid
            and self.cache.layers[layer_idx] is None
        )

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        if self.in_flight is not None:  # runs_in_chunks: a full-attention layer, no window
            return self._attend_chunk(layer_idx, query, key, value, scaling)
        past = self.cache.layers[layer_idx]
        if past is None:  # prefill: these are all the keys; one position row serves every head
            layer = LayerCache(key, value, self.positions[:, None], self.valid[:, None])
        else:
            layer = past.extended(key, value, self.positions, self.valid)
        out = self._attention(query, layer.dense(), scaling, sliding_window, fresh=past is None)
        self._store(layer_idx, query, layer, scaling, sliding_window, fresh=past is None)
        return out

    def _attend_chunk(self, layer_idx, query, key, value, scaling) -> torch.Tensor:
        """Attention of the chunk in flight over the layer's keys so far; the last chunk completes
        the layer (the strategy sees all its queries and keys, as without chunks)."""
        part, seq = self.in_flight, self.positions.shape[1]
        if part.start == 0:
            batch, heads, _, dim = query.shape
            queries = query.new_empty(batch, heads, seq, dim) if self.hooks is not None else None
            self.gathered = (
                key.new_empty(*key.shape[:2], seq, dim),
                value.new_empty(*key.shape[:2], seq, dim),
                queries,
            )
        keys, values, queries = self.gathered
        keys[:, :, part], values[:, :, part] = key, value
        if queries is not None:
            queries[:, :, part] = query
        end = part.start + query.shape[2]
        out = _chunk_attention(query, keys[:, :, :end], values[:, :, :end], part.start, scaling)
        if end == seq:
            self.gathered = None
            layer = LayerCache(keys, values, self.positions[:, None], self.valid[:, None])
            self._store(layer_idx, queries, layer, scaling, sliding_window=None, fresh=True)
        return out

    def _store(self, layer_idx, query, layer: LayerCache, scaling, sliding_window, fresh: bool) -> None:
        """Compress the layer's entries (prefill only, when a strategy runs) and keep them."""
        self.tokens_per_layer.append(self.valid.sum(dim=-1))
        if fresh:
            layer = layer.broadcast_heads()
        if self.hooks is not None:
            layer = self._compress(layer_idx, query, layer, scaling, sliding_window)
        if fresh and sliding_window is not None:  # lossless: decoding never reaches further
            reachable = self.positions > self.cache.next_positions[:, None] - sliding_window
            layer = layer.select((self.valid & reachable)[:, None].expand_as(layer.valid))
        self.cache.layers[layer_idx] = layer

    def _attention(self, query, layer: LayerCache, scaling, sliding_window, fresh: bool) -> torch.Tensor:
        seq = query.shape[2]
        within_window = sliding_window is None or (self.contiguous and seq <= sliding_window)
        if fresh and within_window:
            # Positions sorted along the row: plain causal attention, on the fast kernels.
            if self.all_valid:
                return _causal_attention(query, layer.keys, layer.values, scaling)
            # Left-padded rows (prefill keeps each row's valid tokens last): one causal call per
            # row on its valid tokens, rather than a mask that would push SDPA off its fast kernels.
            out = query.new_zeros(query.shape)
            for row, n in enumerate(self.valid.sum(dim=-1).tolist()):
                if n:
                    part = (slice(row, row + 1), slice(None), slice(seq - n, seq))
                    out[part] = _causal_attention(query[part], layer.keys[part], layer.values[part], scaling)
            return out
        mask = layer.attention_mask(self.positions, self.valid, sliding_window)
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
        return F.scaled_dot_product_attention(
            query, layer.keys, layer.values, attn_mask=mask, scale=scaling, enable_gqa=True
        )

    def _compress(self, layer_idx, query, layer: LayerCache, scaling, sliding_window) -> LayerCache:
        batch, kv_heads, seq, _ = layer.keys.shape
        view = LayerView(
            layer_idx=layer_idx,
            num_layers=len(self.cache.layers),
            queries=query,
            keys=layer.keys,
            values=layer.values,
            positions=self.positions,
            valid=self.valid,
            prompt_lengths=self.cache.next_positions,
            scaling=scaling,
            sliding_window=sliding_window,
        )
        scores = self.hooks.score(layer=view)
        # Sliding-window layers are trimmed to their window instead (in attend).
        keep = self.hooks.retain(layer=view, scores=scores) if sliding_window is None else None
        propagated = self.hooks.propagate(layer=view, scores=scores)
        if propagated is not None:  # the last token always goes on: it makes the logits
            self.propagated = propagated | (torch.arange(seq, device=propagated.device) == seq - 1)
            self.restart = bool(self.hooks.restart(layer=view))
        return layer if keep is None else layer.select(keep.expand(batch, kv_heads, seq))

    def take_propagated(self) -> torch.Tensor:
        """Move on to the propagated tokens; returns the gather order ``[B, T']`` (dropped tokens
        and padding first, the rest right-aligned in position order)."""
        keep, self.propagated = self.propagated, None
        seq = keep.shape[1]
        size = int(keep.sum(dim=-1).max())  # one sync, at the TSP layer only
        order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, seq - size :]
        self.positions = self.positions.gather(1, order)
        self.valid = keep.gather(1, order) & self.valid.gather(1, order)
        self.all_valid = bool(self.valid.all())
        self.contiguous = False
        return order


class Pipeline:
    """A model, its tokenizer, one strategy (plus stacked plugins) and generation settings."""

    def __init__(
        self,
        model,
        tokenizer,
        strategy: Strategy,
        generation: GenerationConfig,
        plugins: Iterable[object] = (),
    ) -> None:
        self.adapter = ModelAdapter(model)
        self.model, self.tokenizer, self.strategy, self.generation = model, tokenizer, strategy, generation
        self.plugin_manager = make_plugin_manager(strategy, plugins)
        # (batch, capacity bucket, compiled) -> buffers and step, the most recently used last
        self._decoders: OrderedDict[tuple[int, int, bool], StaticDecoder] = OrderedDict()

    @classmethod
    def from_config(
        cls, path: str | Path, model, *, tokenizer=None, plugins: Iterable[object] = (), **overrides: Any
    ) -> Pipeline:
        """Build from a YAML/TOML file (see ``kvpress_like.config``); keyword arguments override it."""
        cfg = load_config(path)
        settings = {**cfg.settings, **cfg.generation.model_dump(exclude_unset=True), **overrides}
        return pipeline(model, cfg.strategy, tokenizer=tokenizer, plugins=plugins, **settings)

    def __call__(self, prompts: Prompts, **generation: Any) -> Generation:
        return self.generate(prompts, **generation)

    def compress(self, prompts: Prompts) -> Context:
        """Prefill (and compress) prompts once, to ask several questions of them.

        Text is tokenized as a prefix (no chat template); text given later with ``context=``
        continues it (no template, no special tokens).
        """
        ids, valid = self._encode(prompts, self.generation, mode="prefix")
        self.strategy.check_prompt(valid.sum(dim=-1).tolist())
        with self.adapter.borrowed(), torch.inference_mode():
            return self._prefill(ids, valid, self.generation)

    def extend(self, context: Context, prompts: Prompts, **generation: Any) -> Context:
        """The context followed by more tokens (plain text continues it: no template, no special
        tokens), nothing compressed; its ``last_logits`` are the next-token logits. ``context``
        itself is left as it was. ``generation`` overrides settings (e.g. ``prefill``) for this call."""
        gen = self._generation_config(generation)
        ids, valid = self._encode(prompts, gen, mode="continuation")
        if ids.shape[0] != context.last_logits.shape[0]:
            raise ConfigError(
                f"prompts: must have one row per context row ({context.last_logits.shape[0]}) "
                f"(got {ids.shape[0]})"
            )
        with self.adapter.borrowed(), torch.inference_mode():
            return self._extend(context.clone(), ids, valid, gen.prefill == "compiled")

    def generate(
        self, prompts: Prompts | None = None, *, context: Context | None = None, **generation: Any
    ) -> Generation:
        """Generate from prompts, or from a context (optionally followed by more prompt tokens)."""
        gen = self._generation_config(generation)
        if context is None:
            if prompts is None:
                raise ConfigError("prompts: must be given unless a context is (got None)")
            ids, valid = self._encode(prompts, gen, mode="prompt")
            self.strategy.check_prompt(valid.sum(dim=-1).tolist())
            with self.adapter.borrowed(), torch.inference_mode():
                return self._decode(self._prefill(ids, valid, gen), gen)
        # Decoding grows the cache it is given: it gets a copy, never the caller's context.
        context = context.clone() if prompts is None else self.extend(context, prompts, **generation)
        with self.adapter.borrowed(), torch.inference_mode():
            return self._decode(context, gen)

    # ---- steps -------------------------------------------------------------------------------

    def _generation_config(self, overrides: dict[str, Any]) -> GenerationConfig:
        try:
            return GenerationConfig.model_validate({**self.generation.model_dump(), **overrides})
        except ValidationError as exc:
            raise config_error_from(exc, "generation") from None

    def _encode(
        self, prompts: Prompts, gen: GenerationConfig, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids ``[B, T]`` and valid mask ``[B, T]``; ``mode`` as in ``_tokenize``."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ConfigError(
                f"prompts: must be a non-empty string, list of strings or token ids (got {prompts!r})"
            )
        rows = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                rows.append(self._tokenize(prompt, gen, mode))
            else:
                rows.append([int(t) for t in prompt])
            if not rows[-1]:
                raise ConfigError(f"prompts[{i}]: must contain at least one token (got {prompt!r})")
        width = max(map(len, rows))
        pad = self._pad_id()
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.adapter.device)
        valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=ids.device)
        return ids, valid

    def _tokenize(self, text: str, gen: GenerationConfig, mode: str) -> list[int]:
        """``prompt``: chat template when asked (or available); ``prefix``: plain text with special
        tokens; ``continuation``: plain text without them."""
        tok = self.tokenizer
        if tok is None:
            raise ConfigError(
                "tokenizer: required for text prompts (got None); pass token ids or a tokenizer"
            )
        if not text:
            return []
        if mode == "continuation":
            return tok(text, add_special_tokens=False)["input_ids"]
        use_template = gen.chat_template if gen.chat_template is not None else bool(tok.chat_template)
        if use_template and mode == "prompt":
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    def _pad_id(self) -> int:
        for source in (self.tokenizer, self.model.generation_config, self.model.config):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
        return 0

    def _eos_ids(self) -> torch.Tensor:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.adapter.device)

    def _prefill(self, ids: torch.Tensor, valid: torch.Tensor, gen: GenerationConfig) -> Context:
        start = time.perf_counter()
        compiled = gen.prefill == "compiled"
        positions = (valid.cumsum(dim=-1) - 1).clamp(min=0)
        cache = CompressedCache([None] * self.adapter.info.num_layers, valid.sum(dim=-1))
        chunk = gen.prefill_chunk
        if chunk is not None and not _chunk_kernels_available(self.adapter):
            chunk = None  # no fused kernel with log-sum-exps here: whole layers
        fwd = _Forward(cache, positions, valid, self.plugin_manager.hook, chunk=chunk)
        logits, restart_ids = self._run_layers(ids, fwd, compiled)
        if restart_ids is not None:  # the strategy chose tokens to prefill again on (GemFilter)
            first_pass = fwd.tokens_per_layer
            cache = CompressedCache([None] * self.adapter.info.num_layers, cache.next_positions)
            fwd = _Forward(cache, fwd.positions, fwd.valid, hooks=None, contiguous=False, chunk=chunk)
            logits, _ = self._run_layers(restart_ids, fwd, compiled)
            fwd.tokens_per_layer[: len(first_pass)] = [
                a + b for a, b in zip(first_pass, fwd.tokens_per_layer, strict=False)
            ]
        return Context(cache, logits, self._stats(fwd, cache, valid, _elapsed(start, logits)))

    def _extend(self, context: Context, ids: torch.Tensor, valid: torch.Tensor, compiled: bool) -> Context:
        start = time.perf_counter()
        cache = context.cache
        positions = cache.next_positions[:, None] + (valid.cumsum(dim=-1) - 1).clamp(min=0)
        fwd = _Forward(cache, positions, valid, hooks=None)
        logits, _ = self._run_layers(ids, fwd, compiled)
        cache.next_positions = cache.next_positions + valid.sum(dim=-1)
        return Context(cache, logits, self._stats(fwd, cache, valid, _elapsed(start, logits)))

    def _run_layers(
        self, ids: torch.Tensor, fwd: _Forward, compiled: bool = False
    ) -> tuple[Tensor | None, Tensor | None]:
        """Embed, every decoder layer, then logits of the last position only ``[B, V]``; or, when
        the restart hook asks for it, stop and return the chosen ids ``[B, T']`` instead."""
        hidden = self.adapter.embed(ids)
        rotary: dict[str, tuple] = {}
        for idx, layer_type in enumerate(self.adapter.layer_types):
            if layer_type not in rotary:
                rotary[layer_type] = self.adapter.rotary(hidden, fwd.positions, layer_type)
            if fwd.runs_in_chunks(idx, layer_type, hidden.shape[1]):
                hidden = self._run_layer_in_chunks(idx, hidden, rotary[layer_type], fwd, compiled)
            else:
                hidden = self.adapter.run_layer(idx, hidden, rotary[layer_type], fwd.positions, fwd, compiled)
            if fwd.propagated is not None:
                order = fwd.take_propagated()
                if fwd.restart:
                    return None, ids.gather(1, order)
                hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
                rotary.clear()
        return self.adapter.logits(hidden[:, -1]), None

    def _run_layer_in_chunks(
        self, idx: int, hidden: Tensor, rotary: tuple, fwd: _Forward, compiled: bool
    ) -> Tensor:
        """One decoder layer ``fwd.chunk`` tokens at a time: transformers' per-token work and its
        activations stay chunk-sized; ``fwd.attend`` gathers the layer's keys as they come. Each
        chunk's output replaces its input in place: later chunks need only the keys gathered."""
        for start in range(0, hidden.shape[1], fwd.chunk):
            part = slice(start, start + fwd.chunk)
            fwd.in_flight = part
            rotary_part = tuple(t[:, part] for t in rotary)
            hidden[:, part] = self.adapter.run_layer(
                idx, hidden[:, part], rotary_part, fwd.positions[:, part], fwd, compiled
            )
        fwd.in_flight = None
        return hidden

    def _decode(self, context: Context, gen: GenerationConfig) -> Generation:
        cache, logits = context.cache, context.last_logits
        greedy = logits.argmax(dim=-1)
        step = self._decode_step(cache, gen)
        eos = self._eos_ids()
        generator = None
        if gen.do_sample and gen.seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(gen.seed)
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        all_finished = _FinishedFlag(logits.device)
        clock = _StepClock(logits.device)
        steps: list[torch.Tensor] = []
        for index in range(gen.max_new_tokens):
            token = _sample(logits, gen, generator) if gen.do_sample else greedy
            token = torch.where(finished, eos[0] if len(eos) else token, token)
            steps.append(token)
            finished |= torch.isin(token, eos)
            if index == gen.max_new_tokens - 1 or (gen.stop_on_eos and all_finished.check(finished)):
                break
            logits, greedy = step(token)
            clock.tick()
        step_seconds = clock.seconds()
        tokens = torch.stack(steps, dim=1).tolist()
        token_ids = [_until_eos(row, set(eos.tolist())) if gen.stop_on_eos else row for row in tokens]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in token_ids]
        stats = replace(
            context.stats,
            decode_seconds_per_token=statistics.median(step_seconds) if step_seconds else 0.0,
            decode_step_seconds=tuple(step_seconds),
            new_tokens=tuple(len(row) for row in token_ids),
        )
        return Generation(token_ids, texts, stats)

    def _decode_step(
        self, cache: CompressedCache, gen: GenerationConfig
    ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """The function that takes each row's next token ``[B]`` and returns the logits ``[B, V]``
        and their argmax ``[B]`` (inside the compiled step: no separate, slower argmax launch)."""
        mode = gen.decode
        if mode == "auto":
            mode = "compiled" if self.adapter.device.type == "cuda" else "eager"
        if mode == "eager":

            def eager(token: Tensor) -> tuple[Tensor, Tensor]:
                positions = cache.next_positions[:, None]
                fwd = _Forward(cache, positions, torch.ones_like(positions, dtype=torch.bool), hooks=None)
                logits, _ = self._run_layers(token[:, None], fwd)
                cache.next_positions = cache.next_positions + 1
                return logits, logits.argmax(dim=-1)

            return eager

        batch = cache.next_positions.shape[0]
        needed = max(lc.valid.shape[2] for lc in cache.layers) + gen.max_new_tokens
        key = (batch, capacity_bucket(needed), mode == "compiled")
        if key not in self._decoders:  # buffers and captured graphs are reused within a bucket
            while len(self._decoders) >= KEPT_DECODERS:  # bounded: each holds a whole static cache
                self._decoders.popitem(last=False)
            self._decoders[key] = StaticDecoder(self.adapter, *key)
        self._decoders.move_to_end(key)
        decoder = self._decoders[key]
        decoder.load(cache)
        return decoder.step

    def _stats(self, fwd: _Forward, cache: CompressedCache, valid: torch.Tensor, seconds: float) -> Stats:
        info, head_dim = self.adapter.info, self.adapter.head_dim
        entry_bytes = 2 * head_dim * torch.finfo(self.adapter.dtype).bits // 8
        full = int(cache.next_positions.sum()) * info.num_layers * info.num_kv_heads * entry_bytes
        return Stats(
            prompt_tokens=valid.sum(dim=-1).tolist(),
            tokens_per_layer=torch.stack(fwd.tokens_per_layer).tolist(),
            kv_kept_per_layer=torch.stack([lc.kept_per_row() for lc in cache.layers]).tolist(),
            cache_bytes_full=full,
            cache_bytes_kept=cache.nbytes(),
            prefill_seconds=seconds,
        )


def _sample(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float logits ``[B, V]`` by temperature / top-p sampling."""
    probs = torch.softmax(logits / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > gen.top_p  # the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _causal_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float) -> Tensor:
    """Causal attention ``[B, Hq, T, D]`` over as many keys as queries: flash-attn when installed
    for this GPU (and faster there than cuDNN), else SDPA with cuDNN first."""
    out = flash.causal_attention(query, keys, values, scaling)
    if out is not None:
        return out
    with sdpa_kernel(PREFILL_KERNELS, set_priority=True):
        return F.scaled_dot_product_attention(
            query, keys, values, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=True
        )


def _chunk_attention(query: Tensor, keys: Tensor, values: Tensor, start: int, scaling: float) -> Tensor:
    """Causal attention ``[B, Hq, C, D]`` of the ``C`` queries at indices ``start..`` over the keys
    ``0 .. start + C``: the chunk's own keys (causal, a square) and the earlier ones (all seen) on
    the fast kernels, merged by their log-sum-exps."""
    out, lse = _attention_with_lse(query, keys[:, :, start:], values[:, :, start:], scaling, causal=True)
    if start == 0:
        return out
    earlier, earlier_lse = _attention_with_lse(
        query, keys[:, :, :start], values[:, :, :start], scaling, causal=False
    )
    total = torch.logaddexp(lse, earlier_lse)
    merged = out * (lse - total).exp()[..., None]  # float32 by type promotion
    merged.addcmul_(earlier, (earlier_lse - total).exp()[..., None])
    return merged.to(out.dtype)


def _attention_with_lse(
    query: Tensor, keys: Tensor, values: Tensor, scaling: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """Attention ``[B, Hq, T, D]`` (GQA: KV heads shared by groups of query heads) and its natural
    log-sum-exp ``[B, Hq, T]`` in float32: cuDNN's fused kernel on CUDA, the flash kernel on CPU."""
    if keys.shape[2] == 1:  # one key (cuDNN takes none such): every query takes its value
        groups = query.shape[1] // keys.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
        lse = (query.float() * key.float()).sum(dim=-1) * scaling
        return value.expand_as(query).to(query.dtype), lse
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, True, 0.0, causal, False, scale=scaling
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, causal, scale=scaling
        )
    return out, lse.reshape(query.shape[:3])


def _chunk_kernels_available(adapter: ModelAdapter) -> bool:
    """Whether ``_attention_with_lse`` has its fused kernel here: always on CPU; on CUDA cuDNN's,
    which takes fp16/bf16 and head sizes up to 128 in multiples of 8 (checked once per prefill,
    never per chunk; without it the layers run whole)."""
    if adapter.device.type == "cpu":
        return True
    return (
        adapter.device.type == "cuda"
        and adapter.dtype in (torch.float16, torch.bfloat16)
        and adapter.head_dim <= 128
        and adapter.head_dim % 8 == 0
        and torch.cuda.get_device_capability(adapter.device)[0] >= 8
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


def _elapsed(start: float, result: torch.Tensor) -> float:
    """Seconds since ``start`` once the device has produced ``result``."""
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start


class _StepClock:
    """Seconds between consecutive ``tick``s, from CUDA events on a GPU (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.marks: list = []
        self.tick()

    def tick(self) -> None:
        if self.stream is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.stream is not None:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


class _FinishedFlag:
    """Whether every row has finished, read without stalling the GPU's queue: on CUDA ``check``
    queues a copy to pinned memory and answers from the previous call's copy, so a finished batch
    costs one extra step (its tokens are cut at EOS) instead of a host sync on every step."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.host = torch.zeros(2, dtype=torch.bool, pin_memory=self.stream is not None)
        self.copied: list[torch.cuda.Event] = []

    def check(self, finished: torch.Tensor) -> bool:
        if self.stream is None:
            return bool(finished.all())
        slot = len(self.copied) % 2
        self.host[slot].copy_(finished.all(), non_blocking=True)
        self.copied.append(torch.cuda.Event())
        self.copied[-1].record(self.stream)
        if len(self.copied) < 2:
            return False
        self.copied[-2].synchronize()
        return bool(self.host[1 - slot])


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def pipeline(
    model,
    strategy: str | type[Strategy] = "fastkv",
    *,
    tokenizer=None,
    plugins: Iterable[object] = (),
    **settings: Any,
) -> Pipeline:
    """Wrap a loaded causal LM (or a name/path, or ``"smollm2"`` for the embedded default).

    ``strategy`` is an installed strategy's name (``kvpress-like strategies``) or a Strategy class.

    ``settings`` mixes the strategy's own settings (e.g. ``tsp_rate``) with generation settings
    (``GenerationConfig`` fields, e.g. ``max_new_tokens``); all are validated before any model work.
    """
    generation_fields = set(GenerationConfig.model_fields)
    gen_settings = {k: v for k, v in settings.items() if k in generation_fields}
    strategy_settings = {k: v for k, v in settings.items() if k not in generation_fields}
    try:
        generation = GenerationConfig.model_validate(gen_settings)
    except ValidationError as exc:
        raise config_error_from(exc, "generation") from None
    # Settings are checked before a model is loaded; checks against its depth come after.
    strategy_cls, strategy_settings = strategy_config(strategy, strategy_settings)
    if isinstance(model, str | Path):
        from kvpress_like.models import load_model

        model, loaded_tokenizer = load_model(str(model))
        tokenizer = tokenizer or loaded_tokenizer
    built = strategy_cls(strategy_settings, ModelAdapter(model).info)
    return Pipeline(model, tokenizer, built, generation, plugins)
