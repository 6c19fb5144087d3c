"""kvpress_like: cheaper long-context prefill and decoding for Hugging Face causal LMs.

from kvpress_like import pipeline
pipe = pipeline(model, strategy="fastkv", tokenizer=tokenizer)
print(pipe("a long prompt ...").text)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpress_like.config import EngineConfig, PipelineConfig, StrategyConfig, load_config
    from kvpress_like.errors import ConfigError, ContextFileError, UnsupportedModelError
    from kvpress_like.hookspecs import LayerView, hookimpl
    from kvpress_like.pipeline import Context, Generation, Pipeline, Stats, pipeline
    from kvpress_like.plugins import ModelInfo, Strategy, list_strategies

# The public names resolve on first use (PEP 562), so that ``kvpress_like.errors`` or the CLI's
# ``--help`` do not pay for importing torch and transformers (seconds).
_SOURCES = {
    "ConfigError": "kvpress_like.errors",
    "Context": "kvpress_like.pipeline",
    "ContextFileError": "kvpress_like.errors",
    "Generation": "kvpress_like.pipeline",
    "EngineConfig": "kvpress_like.config",
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
    "ContextFileError",
    "EngineConfig",
    "Generation",
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


# ---- the transformers pipeline task "kvpress-like" (kvpress_like/transformers_task.py) ----------
# Registering it imports transformers.pipelines, which takes about 10 s: too slow for ``import
# kvpress_like`` (and ``kvpress-like --help``). So it is registered when transformers.pipelines is
# imported: at once if it already is, else by a one-shot finder that wraps that module's loader and
# registers right after the module runs. ``transformers.pipeline("kvpress-like", ...)`` then works
# whichever of kvpress_like and transformers was imported first.

_PIPELINES = "transformers.pipelines"


def _register_task() -> None:
    try:
        importlib.import_module("kvpress_like.transformers_task")  # registers on import
    except Exception as exc:  # never break the user's import of transformers for an optional task
        warnings.warn(
            f"kvpress_like: the transformers task 'kvpress-like' is not registered: {exc!r}", stacklevel=2
        )


class _RegisterTaskAfterImport(importlib.abc.MetaPathFinder):
    """On sys.meta_path until transformers.pipelines is imported; finds it with the other finders
    and wraps its loader."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _PIPELINES:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; and the lookup below must not come back here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """The module's own loader, then the registration; the module keeps its own loader after."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader
        _register_task()


if _PIPELINES in sys.modules:
    _register_task()
else:
    sys.meta_path.insert(0, _RegisterTaskAfterImport())
