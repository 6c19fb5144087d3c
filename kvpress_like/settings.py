"""Settings, each sent where it belongs: the strategy's own, the engine's (``EngineConfig``) and
what to generate (transformers' ``GenerationConfig``).

``pipeline(model, "fastkv", tsp_rate=0.2, max_new_tokens=64)`` sorts keywords by the field names
each side knows; a name that two sides know is an error naming both, and the explicit forms
(a strategy's config or instance, ``generation=GenerationConfig(...)``, ``engine=EngineConfig(...)``)
need no sorting. Generation settings start from the model's own ``generation_config``, as
``model.generate`` does, and are checked here, before any model work.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import ConfigDict, Field, ValidationError
from transformers import GenerationConfig

from kvpress_like.config import EngineConfig, NoBoolNumbers
from kvpress_like.errors import ConfigError, config_error_from

if TYPE_CHECKING:
    from kvpress_like.adapter import ModelAdapter
    from kvpress_like.prompts import PromptEncoder

logger = logging.getLogger("kvpress_like")

# transformers' GenerationConfig leaves max_new_tokens unset and then stops at max_length=20
# tokens in all, prompt included; a long-context engine needs a limit of new tokens instead.
DEFAULT_MAX_NEW_TOKENS = 32
GENERATION_FIELDS = frozenset(k for k in GenerationConfig().to_dict() if not k.startswith("_"))
ENGINE_FIELDS = frozenset(EngineConfig.model_fields)
# transformers 5 leaves sampling fields unset (None) and generate() fills in these defaults.
SAMPLING_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}
# generate()'s defaults of every field, where this transformers has them (a value equal to one is
# no request for an unsupported feature).
GLOBAL_DEFAULTS: dict[str, Any] = getattr(GenerationConfig, "_get_default_generation_params", dict)()
# Generation settings the decode loop honours (through transformers' own logits processors and
# stopping criteria); any other one set away from its default is refused rather than ignored.
# max_length (a model's generation_config often carries one), use_cache, cache_implementation and
# return_dict_in_generate belong to transformers' own cache and return paths, which kvpress_like
# replaces: they have no effect, and a call that sets max_length is refused (max_new_tokens counts).
HONOURED = frozenset(
    {
        "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
        "repetition_penalty", "stop_strings", "eos_token_id", "pad_token_id", "bos_token_id",
        "output_scores", "max_length", "transformers_version", "use_cache",
        "return_dict_in_generate", "num_return_sequences", "num_beams", "cache_implementation",
    }
)  # fmt: skip


NonNegative = Annotated[int, Field(ge=0)]


class _GenerationChecks(NoBoolNumbers):
    """The rules of the generation settings the decode loop honours (transformers checks less)."""

    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    stop_strings: str | list[str] | None = None
    eos_token_id: NonNegative | list[NonNegative] | None = None
    pad_token_id: NonNegative | None = None
    num_beams: int | None = Field(None, ge=1, le=1)
    num_return_sequences: int | None = Field(None, ge=1, le=1)


def split_keywords(
    settings: Mapping[str, Any], strategy_name: str, strategy_fields: set[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``settings`` sorted into (strategy, engine, generation) keywords by the names each knows."""
    sides = {
        f"a setting of strategy {strategy_name!r}": strategy_fields,
        "an engine setting (EngineConfig)": ENGINE_FIELDS,
        "a generation setting (transformers' GenerationConfig)": GENERATION_FIELDS,
    }
    parts: list[dict[str, Any]] = [{}, {}, {}]
    for name, value in settings.items():
        owners = [i for i, fields in enumerate(sides.values()) if name in fields]
        if len(owners) > 1:
            both = " and ".join(list(sides)[i] for i in owners)
            raise ConfigError(
                f"{name}: must name one setting, but it is {both}; pass it explicitly: the strategy's "
                f"config (pipeline(model, MyStrategy.Config({name}=...))), generation=GenerationConfig("
                f"{name}=...) or engine=EngineConfig({name}=...) (got {value!r})"
            )
        # A name no side knows goes to the strategy, whose config refuses it naming the field.
        parts[owners[0] if owners else 0][name] = value
    return parts[0], parts[1], parts[2]


def split_generation(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Engine and generation keywords of one mapping (a config file's ``generation:`` section, a
    call's keywords): ``EngineConfig``'s fields, and the rest for transformers' GenerationConfig."""
    engine = {k: v for k, v in settings.items() if k in ENGINE_FIELDS}
    return engine, {k: v for k, v in settings.items() if k not in ENGINE_FIELDS}


def engine_config(base: EngineConfig, overrides: Mapping[str, Any]) -> EngineConfig:
    try:
        return EngineConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise config_error_from(exc, "engine") from None


def generation_config(base: GenerationConfig, overrides: Mapping[str, Any]) -> GenerationConfig:
    """A checked copy of ``base`` updated with ``overrides``; ``max_new_tokens`` always set."""
    if isinstance(overrides.get("generation_config"), GenerationConfig):
        overrides = dict(overrides)
        base = overrides.pop("generation_config")
    config = copy.deepcopy(base)
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ConfigError(f"{name}: must be a GenerationConfig field (got {value!r})")
    if overrides.get("max_length") is not None:
        raise ConfigError(
            f"generation.max_length: kvpress_like counts new tokens, pass max_new_tokens instead "
            f"(got {overrides['max_length']!r})"
        )
    given = {k: v for k, v in overrides.items() if v is not None}  # None: the setting stays
    try:
        checked = _GenerationChecks.model_validate({**config.to_dict(), "max_new_tokens": 1, **given})
        # the checked types ("5" -> 5), which transformers' own validation compares
        given = {
            k: getattr(checked, k) if k in _GenerationChecks.model_fields else v for k, v in given.items()
        }
        config.update(**given)  # transformers validates too
    except ValidationError as exc:
        raise config_error_from(exc, "generation") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"generation: {exc} (got {given})") from None
    if config.max_new_tokens is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    for name, value in SAMPLING_DEFAULTS.items():  # what generate() fills in for unset fields
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    check_generation(config)
    return config


def check_generation(config: GenerationConfig) -> None:
    """Refuse what the decode loop cannot honour, and values that break a rule, naming the field."""
    values = config.to_dict()
    try:
        checked = _GenerationChecks.model_validate(values)
    except ValidationError as exc:
        raise config_error_from(exc, "generation") from None
    for name in checked.model_fields_set:  # the checked types ("0.5" -> 0.5), not what came
        setattr(config, name, getattr(checked, name))
    defaults = GenerationConfig().to_dict()
    for name, value in values.items():
        if name.startswith("_") or name in HONOURED or name not in defaults:
            continue
        if value not in (None, False, defaults[name], GLOBAL_DEFAULTS.get(name)):  # a feature asked for
            raise ConfigError(
                f"generation.{name}: is not supported by kvpress_like's decoding (its default, "
                f"{defaults[name]!r}, is) (got {value!r})"
            )


def check_arguments(generation: Any = None, engine: Any = None, tokenizer: Any = None) -> None:
    """Refuse a pipeline's argument of the wrong kind (a dict for a config, a name for a tokenizer),
    naming it, before anything is built."""
    given = (
        ("generation", generation, GenerationConfig, "transformers' GenerationConfig"),
        ("engine", engine, EngineConfig, "kvpress_like's EngineConfig"),
    )
    for argument, value, kind, what in given:
        if value is not None and not isinstance(value, kind):
            raise ConfigError(
                f"{argument}: must be {what}, or its fields given as keywords "
                f"(got {type(value).__name__} {value!r:.60})"
            )
    if tokenizer is not None and not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        raise ConfigError(
            f"tokenizer: must be a tokenizer object (callable, with decode()), as "
            f"AutoTokenizer.from_pretrained gives (got {tokenizer!r:.60})"
        )


def default_generation(model: Any, given: GenerationConfig | None = None) -> GenerationConfig:
    """The generation settings ``model.generate`` starts from: a copy of ``given`` with the model's
    own settings where it leaves one unset (None; its end-of-sequence ids, say), else the model's."""
    own = getattr(model, "generation_config", None)
    own = own if isinstance(own, GenerationConfig) else GenerationConfig()
    if given is None:
        return copy.deepcopy(own)
    completed = copy.deepcopy(given)
    completed.update(**own.to_dict(), defaults_only=True)
    return completed


# Keywords of one call that are neither engine nor generation settings.
CALL_OPTIONS = ("logits_processor", "stopping_criteria", "streamer", "on_token")


@dataclass(frozen=True)
class CallSettings:
    """Everything one call runs with, checked."""

    engine: EngineConfig
    generation: GenerationConfig
    options: dict[str, Any]  # CALL_OPTIONS given


def call_settings(
    engine: EngineConfig,
    generation: GenerationConfig,
    overrides: Mapping[str, Any],
    strategy_fields: set[str],
) -> CallSettings:
    """The pipeline's settings with one call's keywords applied; a strategy setting is refused (it
    is fixed when the pipeline is built)."""
    options = {k: overrides[k] for k in CALL_OPTIONS if overrides.get(k) is not None}
    engine_part, generation_part = split_generation(
        {k: v for k, v in overrides.items() if k not in CALL_OPTIONS}
    )
    for name in generation_part:
        if name in strategy_fields and name not in GENERATION_FIELDS:
            raise ConfigError(
                f"{name}: a strategy setting is fixed when the pipeline is built, not per call "
                f"(got {generation_part[name]!r})"
            )
    for name in ("logits_processor", "stopping_criteria"):
        if name in options and not (isinstance(options[name], list) and all(map(callable, options[name]))):
            raise ConfigError(f"{name}: must be a list of callables (got {options[name]!r:.60})")
    streamer = options.get("streamer")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise ConfigError(
            f"streamer: must have put() and end(), as transformers' streamers (got {streamer!r:.60})"
        )
    if "on_token" in options and not callable(options["on_token"]):
        raise ConfigError(f"on_token: must be callable (got {options['on_token']!r:.60})")
    return CallSettings(
        engine_config(engine, engine_part), generation_config(generation, generation_part), options
    )


def check_call(
    adapter: ModelAdapter,
    prompts: PromptEncoder,
    prompt_lengths: torch.Tensor,
    call: CallSettings,
    make_room: Callable[[int], None] = lambda needed: None,
) -> None:
    """Refuse a ``max_new_tokens`` that the model's positions or the free memory cannot hold,
    before any allocation; warn, as transformers does, when prompt and new tokens together
    pass the model's positions. ``prompt_lengths`` ``[B]``: tokens before the first new one.
    ``make_room(bytes)`` frees what can be freed (idle decoders) before the memory is read."""
    rows = prompt_lengths.shape[0]
    if call.engine.decode == "compiled" and not adapter.rotary_embedding.compiles:
        raise ConfigError(
            "engine.decode: 'compiled' cannot trace this model's dynamic RoPE (transformers recomputes "
            "its frequencies behind a data-dependent branch); 'static' runs the same buffers uncompiled "
            "(got 'compiled')"
        )
    if "streamer" in call.options and rows > 1:
        raise ConfigError(f"streamer: takes one row, as transformers' streamers do (got {rows} rows)")
    if call.generation.stop_strings and prompts.tokenizer is None:
        raise ConfigError(f"generation.stop_strings: need a tokenizer (got {call.generation.stop_strings!r})")
    vocab = prompts.vocab_size
    eos = prompts.eos_ids(call.generation, torch.device("cpu")).tolist()
    if any(not 0 <= token < vocab for token in eos):  # finished rows are fed EOS: it must embed
        raise ConfigError(f"generation.eos_token_id: must be in [0, {vocab}), the vocabulary (got {eos})")
    wanted = call.generation.max_new_tokens
    limit = getattr(adapter.config, "max_position_embeddings", None)
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
    needed = rows * wanted * adapter.cache_bytes_per_token()
    make_room(needed)
    free = adapter.free_memory()
    if free is not None and needed > free:
        raise ConfigError(
            f"generation.max_new_tokens: the new tokens' cache must fit the free memory of "
            f"{adapter.device}: {rows} row(s) x {wanted} tokens need {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB are free (got {wanted})"
        )
