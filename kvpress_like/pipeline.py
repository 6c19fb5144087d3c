"""``pipeline(model, strategy="fastkv", **settings)``: one request, top to bottom.

encode      text or ids -> left-padded ids, valid mask, true positions
prefill     embed -> every decoder layer (attention routed to ``_Forward.attend``, which asks
            the strategy's hooks ``score`` / ``retain`` / ``propagate``) -> last position's logits
extend      (questions on a compressed context) the same loop, nothing compressed
decode      one token at a time at true positions (prompt length + step), until EOS or the limit
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from kvpress_like import flash
from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache, LayerCache
from kvpress_like.config import GenerationConfig, load_config
from kvpress_like.contracts import Check, HookRunner
from kvpress_like.decode import DecoderPool
from kvpress_like.errors import ConfigError, config_error_from
from kvpress_like.hookspecs import LayerView
from kvpress_like.plugins import Strategy, make_plugin_manager, strategy_config
from kvpress_like.prompts import PromptEncoder, Prompts

logger = logging.getLogger("kvpress_like")


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


class _Forward:
    """State of one forward pass over the layers; transformers' attention calls ``attend``."""

    def __init__(
        self,
        cache: CompressedCache,
        positions: torch.Tensor,
        valid: torch.Tensor,
        hooks: HookRunner | None,
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
        self.checks: list[Check] = []  # the hook answers' value checks, verified after the pass
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
        seq = layer.keys.shape[2]
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
        # Sliding-window layers are not asked to retain: they are trimmed to their window (in attend).
        keep, propagated, self.restart = self.hooks.ask(view, sliding_window is None, self.checks)
        if propagated is not None:  # the last token always goes on: it makes the logits
            self.propagated = propagated | (torch.arange(seq, device=propagated.device) == seq - 1)
        return layer if keep is None else layer.select(keep)

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
    """A model, its tokenizer, one strategy (plus stacked plugins) and generation settings.

    Threads: a call changes nothing another thread can see, neither the model (its layers are
    driven through twins, ``adapter.py``) nor the pipeline (a call's state lives in the call), so
    several threads may call one pipeline, and ``model.generate`` may run beside it. Static and
    compiled decoding take turns on the pipeline's buffers and captured graphs (``DecoderPool``).
    """

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
        window = getattr(strategy.config, "window", 1)
        self._hooks = HookRunner(self.plugin_manager, min_kept=window if isinstance(window, int) else 1)
        self._prompts = PromptEncoder(tokenizer, model)
        self._decoders = DecoderPool(self.adapter)

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
        ids, valid = self._prompts.encode(prompts, "prefix")
        self.strategy.check_prompt(valid.sum(dim=-1).tolist())
        with torch.inference_mode():
            return self._prefill(ids, valid, self.generation)

    def extend(self, context: Context, prompts: Prompts, **generation: Any) -> Context:
        """The context followed by more tokens (plain text continues it: no template, no special
        tokens), nothing compressed; its ``last_logits`` are the next-token logits. ``context``
        itself is left as it was. ``generation`` overrides settings (e.g. ``prefill``) for this call."""
        gen = self._generation_config(generation)
        ids, valid = self._continuation(context, prompts)
        with torch.inference_mode():
            return self._extend(context.clone(), ids, valid, gen.prefill == "compiled")

    def generate(
        self, prompts: Prompts | None = None, *, context: Context | None = None, **generation: Any
    ) -> Generation:
        """Generate from prompts, or from a context (optionally followed by more prompt tokens)."""
        gen = self._generation_config(generation)
        if context is None:
            if prompts is None:
                raise ConfigError("prompts: must be given unless a context is (got None)")
            ids, valid = self._prompts.encode(prompts, "prompt", gen.chat_template)
            lengths = valid.sum(dim=-1)
            self.strategy.check_prompt(lengths.tolist())
            self._check_new_tokens(lengths, gen)
            with torch.inference_mode():
                return self._decode(self._prefill(ids, valid, gen), gen)
        if prompts is None:
            self._check_context(context)
            self._check_new_tokens(context.cache.next_positions, gen)
            context = context.clone()  # decoding grows the cache it is given, never the caller's
        else:
            ids, valid = self._continuation(context, prompts)
            self._check_new_tokens(context.cache.next_positions + valid.sum(dim=-1), gen)
            with torch.inference_mode():
                context = self._extend(context.clone(), ids, valid, gen.prefill == "compiled")
        with torch.inference_mode():
            return self._decode(context, gen)

    def close(self) -> None:
        """Free the static decoders (buffers and captured steps) this pipeline holds."""
        self._decoders.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def source(self) -> dict[str, str]:
        """What a context records of the pipeline that made it (another one must refuse it)."""
        adapter, tok = self.adapter, self.tokenizer
        name = getattr(adapter.config, "name_or_path", "") or "(unnamed)"
        info = adapter.info
        return {
            "model": f"{adapter.config.model_type} {name}",
            "cache shape": f"{info.num_layers} layers x {info.num_kv_heads} KV heads x {adapter.head_dim}",
            "dtype": str(adapter.dtype),
            "device": str(adapter.device),
            "tokenizer": "none"
            if tok is None
            else f"{type(tok).__name__} {getattr(tok, 'name_or_path', '')} ({_vocabulary_size(tok)} tokens)",
        }

    # ---- checks, before any model work -------------------------------------------------------

    def _generation_config(self, overrides: dict[str, Any]) -> GenerationConfig:
        try:
            return GenerationConfig.model_validate({**self.generation.model_dump(), **overrides})
        except ValidationError as exc:
            raise config_error_from(exc, "generation") from None

    def _continuation(self, context: Context, prompts: Prompts) -> tuple[Tensor, Tensor]:
        """Ids and valid mask of the tokens that follow a context, one row per context row."""
        self._check_context(context)
        ids, valid = self._prompts.encode(prompts, "continuation")
        rows = context.last_logits.shape[0]
        if ids.shape[0] != rows:
            raise ConfigError(f"prompts: must have one row per context row ({rows}) (got {ids.shape[0]})")
        return ids, valid

    def _check_context(self, context: Any) -> None:
        if not isinstance(context, Context):
            raise ConfigError(
                f"context: must be a Context from Pipeline.compress (got {type(context).__name__})"
            )
        differs = [
            f"{key} is {context.source.get(key)!r}, here {value!r}"
            for key, value in self.source.items()
            if context.source.get(key) != value
        ]
        if differs:
            raise ConfigError(
                f"context: must come from this pipeline's model and tokenizer; {'; '.join(differs)}"
            )

    def _check_new_tokens(self, prompt_lengths: Tensor, gen: GenerationConfig) -> None:
        """Refuse a ``max_new_tokens`` that the model's positions or the free memory cannot hold,
        before any allocation; warn, as transformers does, when prompt and new tokens together
        pass the model's positions. ``prompt_lengths`` ``[B]``: tokens before the first new one."""
        wanted = gen.max_new_tokens
        limit = getattr(self.adapter.config, "max_position_embeddings", None)
        if isinstance(limit, int) and wanted > limit:
            raise ConfigError(
                f"generation.max_new_tokens: must be at most the model's max_position_embeddings "
                f"({limit}) (got {wanted})"
            )
        longest = int(prompt_lengths.max())
        if isinstance(limit, int) and longest + wanted > limit:
            logger.warning(
                "a prompt of %d tokens plus max_new_tokens=%d passes the model's max_position_embeddings "
                "(%d): positions beyond it were not trained, outputs may degrade",
                longest,
                wanted,
                limit,
            )
        rows = prompt_lengths.shape[0]
        needed = rows * wanted * self.adapter.cache_bytes_per_token()
        free = free_memory(self.adapter.device)
        if free is not None and needed > free:
            raise ConfigError(
                f"generation.max_new_tokens: the new tokens' cache must fit the free memory of "
                f"{self.adapter.device}: {rows} row(s) x {wanted} tokens need {needed / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB are free (got {wanted})"
            )

    # ---- steps -------------------------------------------------------------------------------

    def _prefill(self, ids: torch.Tensor, valid: torch.Tensor, gen: GenerationConfig) -> Context:
        start = time.perf_counter()
        compiled = gen.prefill == "compiled"
        positions = (valid.cumsum(dim=-1) - 1).clamp(min=0)
        cache = CompressedCache([None] * self.adapter.info.num_layers, valid.sum(dim=-1))
        chunk = gen.prefill_chunk
        if chunk is not None and not _chunk_kernels_available(self.adapter):
            chunk = None  # no fused kernel with log-sum-exps here: whole layers
        fwd = _Forward(cache, positions, valid, self._hooks, chunk=chunk)
        try:
            logits, restart_ids = self._run_layers(ids, fwd, compiled)
        except Exception:
            HookRunner.verify(fwd.checks)  # a broken hook answer, if any, is the cause to report
            raise
        HookRunner.verify(fwd.checks)
        if restart_ids is not None:  # the strategy chose tokens to prefill again on (GemFilter)
            first_pass = fwd.tokens_per_layer
            cache = CompressedCache([None] * self.adapter.info.num_layers, cache.next_positions)
            fwd = _Forward(cache, fwd.positions, fwd.valid, hooks=None, contiguous=False, chunk=chunk)
            logits, _ = self._run_layers(restart_ids, fwd, compiled)
            fwd.tokens_per_layer[: len(first_pass)] = [
                a + b for a, b in zip(first_pass, fwd.tokens_per_layer, strict=False)
            ]
        stats = self._stats(fwd, cache, valid, _elapsed(start, logits))
        return Context(cache, logits, stats, self.source)

    def _extend(self, context: Context, ids: torch.Tensor, valid: torch.Tensor, compiled: bool) -> Context:
        start = time.perf_counter()
        cache = context.cache
        positions = cache.next_positions[:, None] + (valid.cumsum(dim=-1) - 1).clamp(min=0)
        fwd = _Forward(cache, positions, valid, hooks=None)
        logits, _ = self._run_layers(ids, fwd, compiled)
        cache.next_positions = cache.next_positions + valid.sum(dim=-1)
        stats = self._stats(fwd, cache, valid, _elapsed(start, logits))
        return Context(cache, logits, stats, context.source)

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
        mode = gen.decode
        if mode == "auto":
            mode = "compiled" if self.adapter.device.type == "cuda" else "eager"
        if mode == "eager":
            return self._decode_loop(context, gen, self._eager_step(context.cache))
        with self._decoders.session(context.cache, gen.max_new_tokens, mode == "compiled") as session:
            return self._decode_loop(context, gen, session.step)

    def _eager_step(self, cache: CompressedCache) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """The layer loop on one token per row ``[B]``: logits ``[B, V]`` and their argmax ``[B]``."""

        def eager(token: Tensor) -> tuple[Tensor, Tensor]:
            positions = cache.next_positions[:, None]
            fwd = _Forward(cache, positions, torch.ones_like(positions, dtype=torch.bool), hooks=None)
            logits, _ = self._run_layers(token[:, None], fwd)
            cache.next_positions = cache.next_positions + 1
            return logits, logits.argmax(dim=-1)

        return eager

    def _decode_loop(
        self, context: Context, gen: GenerationConfig, step: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> Generation:
        """Tokens from the context's last logits on, ``step`` giving the logits ``[B, V]`` and their
        argmax ``[B]`` after each (the argmax inside a compiled step: no separate, slower launch)."""
        logits = context.last_logits
        greedy = logits.argmax(dim=-1)
        eos = self._prompts.eos_ids(logits.device)
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
    for this GPU (and faster there than cuDNN), else cuDNN's fused kernel where it serves these
    inputs, else SDPA's own choice. cuDNN is called directly rather than by reordering SDPA's
    backends, which is process-wide state another thread's attention would see."""
    out = flash.causal_attention(query, keys, values, scaling)
    if out is not None:
        return out
    if query.is_cuda and _cudnn_serves(query):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, False, 0.0, query.shape[2] > 1, False, scale=scaling
        )[0]
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


def _cudnn_serves(tensor: Tensor) -> bool:
    """Whether cuDNN's fused attention takes these CUDA inputs: fp16/bf16, head sizes up to 128 in
    multiples of 8, compute capability 8 or above, and cuDNN attention not switched off."""
    head_dim = tensor.shape[-1]
    return (
        tensor.dtype in (torch.float16, torch.bfloat16)
        and head_dim <= 128
        and head_dim % 8 == 0
        and torch.cuda.get_device_capability(tensor.device)[0] >= 8
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


def _chunk_kernels_available(adapter: ModelAdapter) -> bool:
    """Whether ``_attention_with_lse`` has its fused kernel here: always on CPU; on CUDA cuDNN's
    (checked once per prefill, never per chunk; without it the layers run whole)."""
    if adapter.device.type != "cuda":
        return adapter.device.type == "cpu"
    return _cudnn_serves(torch.empty(0, adapter.head_dim, dtype=adapter.dtype, device=adapter.device))


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: free plus cached by torch; CPU: the
    kernel's MemAvailable), or None where that cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vocabulary_size(tokenizer: Any) -> int | str:
    try:
        return len(tokenizer)
    except TypeError:
        return "?"


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

        try:
            model, loaded_tokenizer = load_model(str(model))
        except (OSError, ValueError) as exc:  # no such path or hub name, or no model in it
            raise ConfigError(f"model: must name a loadable model (got {str(model)!r}): {exc}") from exc
        tokenizer = tokenizer or loaded_tokenizer
    built = strategy_cls(strategy_settings, ModelAdapter(model).info)
    return Pipeline(model, tokenizer, built, generation, plugins)
