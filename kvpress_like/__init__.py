"""kvpress_like: cheaper long-context prefill and decoding for Hugging Face causal LMs.

from kvpress_like import pipeline
pipe = pipeline(model, strategy="fastkv", tokenizer=tokenizer)
print(pipe("a long prompt ...").text)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpress_like.config import GenerationConfig, PipelineConfig, StrategyConfig, load_config
    from kvpress_like.errors import ConfigError, UnsupportedModelError
    from kvpress_like.hookspecs import LayerView, hookimpl
    from kvpress_like.pipeline import Context, Generation, Pipeline, Stats, pipeline
    from kvpress_like.plugins import ModelInfo, Strategy, list_strategies

# The public names resolve on first use (PEP 562), so that ``kvpress_like.errors`` or the CLI's
# ``--help`` do not pay for importing torch and transformers (seconds).
_SOURCES = {
    "ConfigError": "kvpress_like.errors",
    "Context": "kvpress_like.pipeline",
    "Generation": "kvpress_like.pipeline",
    "GenerationConfig": "kvpress_like.config",
    "LayerView": "kvpress_like.hookspecs",
    "ModelInfo": "kvpress_like.plugins",
    "Pipeline": "kvpress_like.pipeline",
    "PipelineConfig": "kvpress_like.config",
    "Stats": "kvpress_like.pipeline",
    "Strategy": "kvpress_like.plugins",
    "StrategyConfig": "kvpress_like.config",
    "UnsupportedModelError": "kvpress_like.errors",
    "hookimpl": "kvpress_like.hookspecs",
    "list_strategies": "kvpress_like.plugins",
    "load_config": "kvpress_like.config",
    "pipeline": "kvpress_like.pipeline",
}

__all__ = [
    "ConfigError",
    "Context",
    "Generation",
    "GenerationConfig",
    "LayerView",
    "ModelInfo",
    "Pipeline",
    "PipelineConfig",
    "Stats",
    "Strategy",
    "StrategyConfig",
    "UnsupportedModelError",
    "hookimpl",
    "list_strategies",
    "load_config",
    "pipeline",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: ``kvpress_like.pipeline`` stays the function, as with eager imports.

    Importing the submodule ``kvpress_like.pipeline`` makes Python bind the module object to this
    package's ``pipeline`` attribute, which would then shadow the function for every later
    ``from kvpress_like import pipeline``; bind the function instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "pipeline" and isinstance(value, types.ModuleType):
            value = getattr(value, "pipeline", value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
