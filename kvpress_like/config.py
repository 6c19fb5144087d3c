"""Pydantic settings: generation knobs, the base of every strategy's settings, and config files.

A config file (YAML or TOML) looks like::

    strategy: fastkv
    settings:            # fields of the strategy's own Config model
      tsp_rate: 0.2
      retain_rate: 0.1
    generation:          # fields of GenerationConfig
      max_new_tokens: 64
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvpress_like.errors import ConfigError, config_error_from


class StrictModel(BaseModel):
    """Unknown keys are an error, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StrategyConfig(StrictModel):
    """Base class of every strategy's settings (each strategy subclasses it)."""


class GenerationConfig(StrictModel):
    """How a request runs: prefill mode, then how tokens are produced."""

    max_new_tokens: int = Field(32, ge=1, description="upper bound on generated tokens per sequence")
    do_sample: bool = Field(False, description="sample instead of greedy argmax")
    temperature: float = Field(1.0, gt=0, description="softmax temperature when sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass when sampling")
    seed: int | None = Field(None, description="seed of the sampling generator (None: nondeterministic)")
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
        "whole layers",
    )
    chat_template: bool | None = Field(
        None, description="wrap text prompts in the tokenizer's chat template (None: when it has one)"
    )


class PipelineConfig(StrictModel):
    """What a config file holds: a strategy by name, its settings, and generation settings."""

    strategy: str = "fastkv"
    settings: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a validated PipelineConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file: must exist (got {str(path)!r})")
    text = path.read_text()
    if path.suffix == ".toml":
        raw = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"config file: suffix must be .yaml, .yml or .toml (got {path.suffix!r})")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file: top level must be a mapping (got {type(raw).__name__})")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error_from(exc, path.name) from None
