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
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from kvpress_like import compile_cache
from kvpress_like.adapter import ModelAdapter
from kvpress_like.batching import join_contexts, split_rows
from kvpress_like.cache import CompressedCache
from kvpress_like.chunked_prefill import run_in_chunks, run_propagation_layer
from kvpress_like.config import EngineConfig, StrategyConfig, load_config
from kvpress_like.contracts import HookRunner
from kvpress_like.decode import DecoderPool
from kvpress_like.errors import ConfigError
from kvpress_like.forward import Forward
from kvpress_like.generation import Request, Step, decode_loop, elapsed
from kvpress_like.identity import origin
from kvpress_like.plugins import Strategy, check_plugins, make_plugin_manager, strategy_class, strategy_config
from kvpress_like.prefill_attention import chunk_kernels_available
from kvpress_like.prompts import PromptEncoder, Prompts
from kvpress_like.results import Context, Generation, Stats, check_context, context_source
from kvpress_like.sampling import Sampling, choose
from kvpress_like.settings import (
    CallSettings,
    call_settings,
    check_arguments,
    check_call,
    default_generation,
    engine_config,
    generation_config,
    split_generation,
    split_keywords,
)

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
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        strategy: Strategy,
        engine: EngineConfig | None = None,
        generation: GenerationConfig | None = None,
        plugins: Iterable[object] = (),
        generation_settings: dict[str, Any] | None = None,
    ) -> None:
        self.adapter = ModelAdapter(model)
        self.model, self.tokenizer, self.strategy = model, tokenizer, strategy
        self.engine = engine or EngineConfig()
        # None: the model's own generation_config, read at every call as model.generate reads it
        self._generation_base = generation
        self._generation_settings = dict(generation_settings or {})
        _ = self.generation  # checked now, before any call
        self.plugin_manager = make_plugin_manager(strategy, plugins)
        window = getattr(strategy.config, "window", 1)
        min_kept = window if isinstance(window, int) else 1
        self._hooks = HookRunner(self.plugin_manager, min_kept, self.adapter.parallel)
        self._prompts = PromptEncoder(tokenizer, model)
        self._decoders = DecoderPool(self.adapter)
        if self.engine.compile_cache is not None:
            compile_cache.load(self.engine.compile_cache)
        # Read once: a device-to-host copy of a few weights and a vocabulary hash.
        self.origin = origin(model, tokenizer, strategy)

    @classmethod
    def from_config(
        cls,
        path: str | Path,
        model: PreTrainedModel | str,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        plugins: Iterable[object] = (),
        **overrides: Any,
    ) -> Pipeline:
        """Build from a YAML/TOML file (see ``kvpress_like.config``); keyword arguments override it.
        The file's sections are never merged: ``settings`` are the strategy's, ``generation`` the
        engine's and transformers' GenerationConfig's."""
        check_arguments(tokenizer=tokenizer)
        cfg = load_config(path)
        name = cfg.strategy
        strategy_kw, engine_kw, generation_kw = split_keywords(
            overrides, name, set(strategy_class(name).Config.model_fields)
        )
        engine_file, generation_file = split_generation(cfg.generation)
        try:  # the file's own sections first, so that an error names the file
            engine_config(EngineConfig(), engine_file)
            generation_config(GenerationConfig(), generation_file)
        except ConfigError as exc:
            raise ConfigError(f"{Path(path).name}.{exc}") from None
        return _build(
            model,
            name,
            {**cfg.settings, **strategy_kw},
            engine_config(EngineConfig(), {**engine_file, **engine_kw}),
            None,
            {**generation_file, **generation_kw},
            tokenizer,
            plugins,
        )

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
            return self._prefill(ids, valid, self.engine)

    def extend(self, context: Context, prompts: Prompts, **engine: Any) -> Context:
        """The context followed by more tokens (plain text continues it: no template, no special
        tokens), nothing compressed; its ``last_logits`` are the next-token logits. ``context``
        itself is left as it was. ``engine`` overrides engine settings (e.g. ``prefill``)."""
        settings = engine_config(self.engine, engine)
        ids, valid = self._continuation(context, prompts)
        with torch.inference_mode():
            return self._extend(context.clone(), ids, valid, settings.prefill == "compiled")

    def generate(
        self, prompts: Prompts | None = None, *, context: Context | None = None, **settings: Any
    ) -> Generation:
        """Generate from prompts, or from a context (optionally followed by more prompt tokens).

        ``settings``: engine and generation settings for this call (``max_new_tokens=8``,
        ``generation_config=GenerationConfig(...)``, ``decode="eager"``, ...), and
        ``logits_processor`` / ``stopping_criteria`` lists, a ``streamer`` (transformers' streamer
        protocol) or an ``on_token`` callback, on every decode path."""
        call = self._call_settings(settings)
        if context is None:
            if prompts is None:
                raise ConfigError("prompts: must be given unless a context is (got None)")
            ids, valid = self._prompts.encode(prompts, "prompt", call.engine.chat_template)
            lengths = valid.sum(dim=-1)
            self.strategy.check_prompt(lengths.tolist())
            self._check_call(lengths, call)
            with torch.inference_mode():
                return self._decode(self._prefill(ids, valid, call.engine), call)
        if prompts is None:
            self._check_context(context)
            self._check_call(context.cache.next_positions, call)
            context = context.clone()  # decoding grows the cache it is given, never the caller's
        else:
            ids, valid = self._continuation(context, prompts)
            self._check_call(context.cache.next_positions + valid.sum(dim=-1), call)
            with torch.inference_mode():
                context = self._extend(context.clone(), ids, valid, call.engine.prefill == "compiled")
        with torch.inference_mode():
            return self._decode(context, call)

    @property
    def generation(self) -> GenerationConfig:
        """The generation settings a call starts from: the given GenerationConfig completed from the
        model's own ``generation_config`` as it is now (as ``model.generate`` completes it), else the
        model's own, with the pipeline's keyword settings applied."""
        return generation_config(
            default_generation(self.model, self._generation_base), self._generation_settings
        )

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
        return context_source(self.adapter, self.origin["model"], self.origin["tokenizer"])

    # ---- checks, before any model work -------------------------------------------------------

    def _continuation(self, context: Context, prompts: Prompts) -> tuple[Tensor, Tensor]:
        """Ids and valid mask of the tokens that follow a context, one row per context row."""
        self._check_context(context)
        ids, valid = self._prompts.encode(prompts, "continuation")
        rows = context.last_logits.shape[0]
        if ids.shape[0] != rows:
            raise ConfigError(f"prompts: must have one row per context row ({rows}) (got {ids.shape[0]})")
        return ids, valid

    def check_settings(self, prompt_tokens: int, **settings: Any) -> None:
        """Raise the error a call with these settings on one row of ``prompt_tokens`` would raise
        before its prefill, without running anything (e.g. before compressing a context)."""
        self._check_call(torch.tensor([prompt_tokens]), self._call_settings(settings))

    def _call_settings(self, settings: dict[str, Any]) -> CallSettings:
        """One call's settings, checked; a GenerationConfig among them is completed from the
        model's own, as ``model.generate`` completes one it is given."""
        given = settings.get("generation_config")
        if isinstance(given, GenerationConfig):
            settings = {**settings, "generation_config": default_generation(self.model, given)}
        strategy_fields = set(type(self.strategy.config).model_fields)
        return call_settings(self.engine, self.generation, settings, strategy_fields)

    def _check_call(self, prompt_lengths: Tensor, call: CallSettings) -> None:
        check_call(self.adapter, self._prompts, prompt_lengths, call, self._decoders.make_room)

    def _check_context(self, context: Any) -> None:
        check_context(context, self.source)

    # ---- steps -------------------------------------------------------------------------------

    def _prefill(self, ids: torch.Tensor, valid: torch.Tensor, engine: EngineConfig) -> Context:
        """All rows at once, or ``engine.prefill_rows`` at a time, joined (``batching.py``)."""
        self._decoders.make_room(ids.numel() * self.adapter.cache_bytes_per_token())  # a full cache's
        parts = split_rows(ids, valid, engine.prefill_rows)
        if len(parts) == 1:
            return self._prefill_rows(ids, valid, engine)
        return join_contexts([self._prefill_rows(*part, engine) for part in parts], ids, valid)

    def _prefill_rows(self, ids: torch.Tensor, valid: torch.Tensor, engine: EngineConfig) -> Context:
        start = time.perf_counter()
        compiled = engine.prefill == "compiled"
        positions = (valid.cumsum(dim=-1) - 1).clamp(min=0)
        cache = CompressedCache([None] * self.adapter.info.num_layers, valid.sum(dim=-1))
        chunk = engine.prefill_chunk
        if chunk is not None and not chunk_kernels_available(self.adapter):
            chunk = None  # no fused kernel with log-sum-exps here: whole layers
            logger.info(
                "prefill_chunk=%d not used: no fused attention kernel with log-sum-exps for "
                "%s on %s, prefilling whole layers",
                engine.prefill_chunk,
                self.adapter.dtype,
                self.adapter.device,
            )
        hint = self.strategy.propagation_layer()
        fwd = Forward(cache, positions, valid, self._hooks, chunk=chunk, propagation_layer=hint)
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
        return Context(cache, logits, stats, self.source, ids, valid, self.origin)

    def _extend(self, context: Context, ids: torch.Tensor, valid: torch.Tensor, compiled: bool) -> Context:
        start = time.perf_counter()
        cache = context.cache
        positions = cache.next_positions[:, None] + (valid.cumsum(dim=-1) - 1).clamp(min=0)
        fwd = Forward(cache, positions, valid, hooks=None)
        logits, _ = self._run_layers(ids, fwd, compiled)
        cache.next_positions = cache.next_positions + valid.sum(dim=-1)
        stats = self._stats(fwd, cache, valid, elapsed(start, logits))
        ids, valid = torch.cat([context.ids, ids], dim=1), torch.cat([context.valid, valid], dim=1)
        return Context(cache, logits, stats, context.source, ids, valid, context.origin)

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
            positions, seq = fwd.positions, hidden.shape[1]
            if fwd.runs_in_two_passes(idx, layer_type, seq):  # may move on to the propagated tokens
                hidden = run_propagation_layer(
                    self.adapter, idx, layer_type, hidden, rotary[layer_type], fwd, compiled
                )
            elif fwd.runs_in_chunks(idx, layer_type, seq):
                hidden = run_in_chunks(self.adapter, idx, hidden, rotary[layer_type], fwd, compiled)
            else:
                hidden = self.adapter.run_layer(idx, hidden, rotary[layer_type], fwd.positions, fwd, compiled)
            if fwd.propagated is not None:
                order = fwd.take_propagated()
                if fwd.restart:
                    return None, ids.gather(1, order)
                hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
            if fwd.positions is not positions:  # moved on to the propagated tokens
                rotary.clear()
        return self.adapter.logits(hidden[:, -1]), None

    def _decode(self, context: Context, call: CallSettings) -> Generation:
        mode = call.engine.decode
        if mode == "auto" and self.adapter.device.type != "cuda":
            mode = "eager"
        elif mode == "auto":
            mode = "compiled" if self.adapter.rotary_embedding.compiles else "static"
            if mode == "static":
                logger.info(
                    "decode: static, not compiled: torch.compile cannot trace the model's dynamic RoPE"
                )
        request = Request(
            generation=call.generation,
            eos=self._prompts.eos_ids(call.generation, self.adapter.device),
            seed=call.engine.seed,
            stop_on_eos=call.engine.stop_on_eos,
            output_scores=bool(call.generation.output_scores),
            tokenizer=self.tokenizer,
            **call.options,
        )
        if mode == "eager":
            return decode_loop(context, request, self._eager_step(context.cache))
        max_new = call.generation.max_new_tokens
        with self._decoders.session(context.cache, max_new, mode == "compiled") as session:
            return decode_loop(context, request, session.step)

    def _eager_step(self, cache: CompressedCache) -> Step:
        """The layer loop on one token per row ``[B]``: logits ``[B, V]`` and the next token ``[B]``
        (their argmax, or a draw: ``sampling.choose``)."""

        def eager(token: Tensor, noise: Tensor | None, sampling: Sampling | None) -> tuple[Tensor, Tensor]:
            positions = cache.next_positions[:, None]
            fwd = Forward(cache, positions, torch.ones_like(positions, dtype=torch.bool), hooks=None)
            logits, _ = self._run_layers(token[:, None], fwd)
            cache.next_positions = cache.next_positions + 1
            return logits, logits.argmax(dim=-1) if sampling is None else choose(logits, noise, sampling)

        return eager

    def _stats(self, fwd: Forward, cache: CompressedCache, valid: torch.Tensor, seconds: float) -> Stats:
        info, head_dim = self.adapter.info, self.adapter.head_dim
        entry_bytes = 2 * head_dim * torch.finfo(self.adapter.dtype).bits // 8
        heads = self.adapter.local_kv_heads  # this rank's
        full = int(cache.next_positions.sum()) * info.num_layers * heads * entry_bytes
        return Stats(
            prompt_tokens=valid.sum(dim=-1).tolist(),
            tokens_per_layer=torch.stack(fwd.tokens_per_layer).tolist(),
            kv_kept_per_layer=torch.stack([lc.kept_per_row() for lc in cache.layers]).tolist(),
            cache_bytes_full=full,
            cache_bytes_kept=cache.nbytes(),
            prefill_seconds=seconds,
        )


def pipeline(
    model: PreTrainedModel | str | Path,
    strategy: str | type[Strategy] | Strategy | StrategyConfig = "fastkv",
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    plugins: Iterable[object] = (),
    generation: GenerationConfig | None = None,
    engine: EngineConfig | None = None,
    **settings: Any,
) -> Pipeline:
    """Wrap a loaded causal LM (or a name/path, or ``"smollm2"`` for the embedded default).

    ``strategy``: an installed strategy's name (``kvpress-like strategies``), a Strategy class, a
    strategy's settings (``FastKV.Config(tsp_rate=0.2)``) or a built Strategy. ``generation``:
    transformers' ``GenerationConfig`` (default: the model's own ``generation_config``, as
    ``model.generate`` uses). ``engine``: kvpress_like's ``EngineConfig`` (decode and prefill modes).

    ``settings`` are keywords for any of the three, sorted by the names each knows
    (``tsp_rate=0.2, max_new_tokens=64, decode="eager"``); a name two of them know is refused,
    naming both. Everything is validated before the model is loaded or run.
    """
    check_arguments(generation=generation, engine=engine, tokenizer=tokenizer)
    cls = strategy_class(strategy)
    name = getattr(cls, "name", cls.__name__)
    strategy_kw, engine_kw, generation_kw = split_keywords(settings, name, set(cls.Config.model_fields))
    if strategy_kw and isinstance(strategy, Strategy | StrategyConfig):
        raise ConfigError(
            f"{next(iter(strategy_kw))}: the strategy's settings come with the {type(strategy).__name__} "
            f"given; set them there (got {strategy_kw})"
        )
    return _build(
        model, strategy, strategy_kw, engine_config(engine or EngineConfig(), engine_kw), generation,
        generation_kw, tokenizer, plugins,
    )  # fmt: skip


def _build(
    model: PreTrainedModel | str | Path,
    strategy: str | type[Strategy] | Strategy | StrategyConfig,
    strategy_kw: dict[str, Any],
    engine: EngineConfig,
    generation: GenerationConfig | None,
    generation_kw: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase | None,
    plugins: Iterable[object],
) -> Pipeline:
    """A pipeline from sorted settings: all are checked before a model is loaded, those against
    the model (its depth, its generation_config) right after."""
    generation_config(generation or GenerationConfig(), generation_kw)
    plugins = check_plugins(plugins)
    if isinstance(strategy, StrategyConfig):
        cls, config = strategy_class(strategy), strategy
    elif not isinstance(strategy, Strategy):
        cls, config = strategy_config(strategy, strategy_kw)
    if isinstance(model, str | Path):
        from kvpress_like.models import load_model

        try:
            model, loaded_tokenizer = load_model(str(model))
        except (OSError, ValueError) as exc:  # no such path or hub name, or no model in it
            raise ConfigError(f"model: must name a loadable model (got {str(model)!r}): {exc}") from exc
        tokenizer = tokenizer or loaded_tokenizer
    built = strategy if isinstance(strategy, Strategy) else cls(config, ModelAdapter(model).info)
    return Pipeline(model, tokenizer, built, engine, generation, plugins, generation_kw)
