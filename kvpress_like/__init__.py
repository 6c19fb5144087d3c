"""kvpress_like: cheaper long-context prefill and decoding for Hugging Face causal LMs.

from kvpress_like import pipeline
pipe = pipeline(model, strategy="fastkv", tokenizer=tokenizer)
print(pipe("a long prompt ...").text)
"""

from kvpress_like.config import GenerationConfig, PipelineConfig, StrategyConfig, load_config
from kvpress_like.errors import ConfigError, UnsupportedModelError
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.pipeline import Context, Generation, Pipeline, Stats, pipeline
from kvpress_like.plugins import ModelInfo, Strategy, list_strategies

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
