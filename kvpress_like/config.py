"""Pydantic settings: generation knobs, the base of every strategy's settings, and config files.

A config file (YAML or TOML) looks like::

    strategy: fastkv
    settings:            # fields of the strategy's own Config model
      tsp_rate: 0.2
      retain_rate: 0.1
    generation:          # fields of EngineConfig and of transformers' GenerationConfig
      max_new_tokens: 64
      decode: compiled
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kvpress_like.errors import ConfigError, config_error_from


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes True/False as such (bool, Any, a Literal of one)."""
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(value, bool) for value in get_args(annotation))
    if get_origin(annotation) is Annotated:
        return _admits_bool(get_args(annotation)[0])
    return any(_admits_bool(arg) for arg in get_args(annotation))


class NoBoolNumbers(BaseModel):
    """Pydantic's lax mode reads True as 1: a number field refuses a bool instead."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("must not be a bool")
        return value


class StrictModel(NoBoolNumbers):
    """Unknown keys are an error, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StrategyConfig(StrictModel):
    """Base class of every strategy's settings (each strategy subclasses it)."""


class EngineConfig(StrictModel):
    """How kvpress_like runs a request: prefill and decode modes, the sampling seed, the chat
    template. What to generate (max_new_tokens, sampling, stop strings, ...) is transformers'
    ``GenerationConfig``."""

    seed: int | None = Field(
        None,
        ge=-(2**63),
        lt=2**64,  # what torch.Generator.manual_seed takes
        description="seed of the sampling generator (None: nondeterministic)",
    )
    stop_on_eos: bool = Field(True, description="stop a sequence at the model's end-of-sequence token")
    decode: Literal["auto", "eager", "static", "compiled"] = Field(
        "auto",
        description="eager: the layer loop per token; static: preallocated buffers; compiled: static plus "
        "torch.compile with CUDA graphs (auto: compiled on CUDA, eager elsewhere)",
    )
    prefill: Literal["eager", "compiled"] = Field(
        "eager",
        description="compiled: torch.compile (dynamic shapes) fuses transformers' per-token work around "
        "attention (norms, RoPE, activations); attention and the strategy's hooks stay eager. Opt-in: "
        "6% faster at 128K on an H200, for a first call 4-12 s longer (the compile)",
    )
    prefill_chunk: int | None = Field(
        16384,
        ge=1,
        description="prefill full-attention layers this many tokens at a time (attention over all keys "
        "so far), which bounds their activations on a long prompt (H200, 128K: peak 19.9 vs 22.3 GiB, "
        "2.5% faster); None: whole layers. Sliding-window layers, padded batches and fp32 on CUDA run "
        "whole layers; the strategy's propagation layer (FastKV's TSP layer, where only the propagated "
        "queries attend) runs in chunks up to attention, then on the propagated tokens",
    )
    prefill_rows: int | None = Field(
        None,
        ge=1,
        description="prefill a batch this many rows at a time, each part's kept entries joining the "
        "batch's cache: the peak is the kept caches plus one part's prefill, not the whole batch's "
        "activations; None: all rows at once",
    )
    chat_template: bool | None = Field(
        None, description="wrap text prompts in the tokenizer's chat template (None: when it has one)"
    )
    compile_cache: str | None = Field(
        None,
        description="file of torch.compile artifacts (`kvpress-like warmup` writes it) loaded when the "
        "pipeline is built, so that compiling the decode step reuses its code and kernel tuning",
    )


class PipelineConfig(StrictModel):
    """What a config file holds: a strategy by name, its settings, and generation settings."""

    strategy: str = "fastkv"
    settings: dict[str, Any] = Field(default_factory=dict)
    # EngineConfig fields and transformers GenerationConfig fields (the two share no name)
    generation: dict[str, Any] = Field(default_factory=dict)


def _read_config_text(path: Path) -> str:
    """The file's text, or a ConfigError saying why it cannot be read (no OSError escapes)."""
    if not path.exists():
        raise ConfigError(f"config file: must exist (got {str(path)!r})")
    if path.is_dir():
        raise ConfigError(f"config file: must be a file, not a directory (got {str(path)!r})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file: must be UTF-8 text, byte {exc.start} is not (got {str(path)!r})"
        ) from None
    except OSError as exc:  # permissions, a broken symlink, an I/O error
        raise ConfigError(
            f"config file: must be readable, {exc.strerror or exc} (got {str(path)!r})"
        ) from None


def _yaml_error(exc: yaml.YAMLError, path: Path) -> ConfigError:
    """``path:LINE:COL``-style position (1-based) and pyyaml's own reason, on one line."""
    mark = getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or mark is None:
        reason = " ".join(str(exc).split())  # e.g. ReaderError: an unprintable character
        return ConfigError(f"config file: must be valid YAML, {reason} (got {str(path)!r})")
    reason = exc.problem or "syntax error"
    if exc.context:  # e.g. "while parsing a flow sequence": where that began helps more
        where = exc.context_mark
        began = f" from line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        reason = f"{reason} ({exc.context}{began})"
    return ConfigError(
        f"config file: must be valid YAML, {reason} at line {mark.line + 1}, column {mark.column + 1} "
        f"(got {str(path)!r})"
    )


_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)$")


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, path: Path) -> ConfigError:
    """TOMLDecodeError has ``lineno``/``colno`` from Python 3.14; before, only its message says where."""
    message = str(exc.args[0]) if exc.args else str(exc)
    line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    match = _TOML_POSITION.search(message)
    if match:
        message = message[: match.start()]
        if line is None and match.group(1):
            line, col = int(match.group(1)), int(match.group(2))
    message = getattr(exc, "msg", None) or message
    if line is None:  # "at end of document"
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    return ConfigError(
        f"config file: must be valid TOML, {message} at line {line}, column {col} (got {str(path)!r})"
    )


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a validated PipelineConfig.

    Every problem with the file (missing, unreadable, malformed, invalid) is a ConfigError.
    """
    path = Path(path)
    text = _read_config_text(path)
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _toml_error(exc, text, path) from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, path) from None
    else:
        raise ConfigError(f"config file: suffix must be .yaml, .yml or .toml (got {path.suffix!r})")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file: top level must be a mapping (got {type(raw).__name__})")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error_from(exc, path.name) from None
