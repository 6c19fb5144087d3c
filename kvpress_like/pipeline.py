"""``pipeline(model, strategy="fastkv", **settings)``: one request, top to bottom.

encode      text or ids -> left-padded ids, valid mask, true positions (``prompts.py``)
prefill     embed -> every decoder layer (attention routed to ``Forward.attend``, ``forward.py``,
            which asks the strategy's hooks ``score`` / ``retain`` / ``propagate`` through
            ``contracts.py``) -> last position's logits
extend      (questions on a compressed context) the same loop, nothing compressed
decode      one token at a time at true positions (prompt length + step), until EOS or the limit
            (``generation.py``; static buffers and the compiled step in ``decode.py``)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache
from kvpress_like.config import GenerationConfig, load_config
from kvpress_like.contracts import HookRunner
from kvpress_like.decode import DecoderPool
from kvpress_like.errors import ConfigError, config_error_from
from kvpress_like.forward import Forward
from kvpress_like.generation import Step, decode_loop, elapsed
from kvpress_like.plugins import Strategy, make_plugin_manager, strategy_config
from kvpress_like.prefill_attention import chunk_kernels_available
from kvpress_like.prompts import PromptEncoder, Prompts
from kvpress_like.results import Context, Generation, Stats

logger = logging.getLogger("kvpress_like")

__all__ = ["Context", "Generation", "Pipeline", "Stats", "pipeline"]


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
        free = self.adapter.free_memory()
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
        if chunk is not None and not chunk_kernels_available(self.adapter):
            chunk = None  # no fused kernel with log-sum-exps here: whole layers
        fwd = Forward(cache, positions, valid, self._hooks, chunk=chunk)
        try:
            logits, restart_ids = self._run_layers(ids, fwd, compiled)
        except Exception:
            HookRunner.verify(fwd.checks)  # a broken hook answer, if any, is the cause to report
            raise
        HookRunner.verify(fwd.checks)
        if restart_ids is not None:  # the strategy chose tokens to prefill again on (GemFilter)
            first_pass = fwd.tokens_per_layer
            cache = CompressedCache([None] * self.adapter.info.num_layers, cache.next_positions)
            fwd = Forward(cache, fwd.positions, fwd.valid, hooks=None, contiguous=False, chunk=chunk)
            logits, _ = self._run_layers(restart_ids, fwd, compiled)
            fwd.tokens_per_layer[: len(first_pass)] = [
                a + b for a, b in zip(first_pass, fwd.tokens_per_layer, strict=False)
            ]
        stats = self._stats(fwd, cache, valid, elapsed(start, logits))
        return Context(cache, logits, stats, self.source)

    def _extend(self, context: Context, ids: torch.Tensor, valid: torch.Tensor, compiled: bool) -> Context:
        start = time.perf_counter()
        cache = context.cache
        positions = cache.next_positions[:, None] + (valid.cumsum(dim=-1) - 1).clamp(min=0)
        fwd = Forward(cache, positions, valid, hooks=None)
        logits, _ = self._run_layers(ids, fwd, compiled)
        cache.next_positions = cache.next_positions + valid.sum(dim=-1)
        stats = self._stats(fwd, cache, valid, elapsed(start, logits))
        return Context(cache, logits, stats, context.source)

    def _run_layers(
        self, ids: torch.Tensor, fwd: Forward, compiled: bool = False
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
        self, idx: int, hidden: Tensor, rotary: tuple, fwd: Forward, compiled: bool
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
            return decode_loop(context, gen, self._eager_step(context.cache), self._eos(), self.tokenizer)
        with self._decoders.session(context.cache, gen.max_new_tokens, mode == "compiled") as session:
            return decode_loop(context, gen, session.step, self._eos(), self.tokenizer)

    def _eos(self) -> Tensor:
        return self._prompts.eos_ids(self.adapter.device)

    def _eager_step(self, cache: CompressedCache) -> Step:
        """The layer loop on one token per row ``[B]``: logits ``[B, V]`` and their argmax ``[B]``."""

        def eager(token: Tensor) -> tuple[Tensor, Tensor]:
            positions = cache.next_positions[:, None]
            fwd = Forward(cache, positions, torch.ones_like(positions, dtype=torch.bool), hooks=None)
            logits, _ = self._run_layers(token[:, None], fwd)
            cache.next_positions = cache.next_positions + 1
            return logits, logits.argmax(dim=-1)

        return eager

    def _stats(self, fwd: Forward, cache: CompressedCache, valid: torch.Tensor, seconds: float) -> Stats:
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


def _vocabulary_size(tokenizer: Any) -> int | str:
    try:
        return len(tokenizer)
    except TypeError:
        return "?"


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
