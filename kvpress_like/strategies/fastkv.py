from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from kvpress_like.config import StrategyConfig
from kvpress_like.errors import ConfigError
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.plugins import ModelInfo, Strategy
from kvpress_like.selection import Pooling, budgets, rate_budget, recent_mask, top_k_mask, window_scores

# The paper puts TSP at layer 15 of Llama-3.1-8B's 32: about 47% of depth.
DEFAULT_TSP_DEPTH = 0.47


class FastKVConfig(StrategyConfig):
    """FastKV settings. Budgets are rates of each prompt's length (``proportional``) or token
    counts (``constant``); both include the ``window`` most recent tokens, which are always kept."""

    tsp_layer: int | None = Field(None, ge=0, description="layer whose scores choose the propagated tokens")
    budget_mode: Literal["proportional", "constant"] = "proportional"
    tsp_rate: float = Field(0.2, gt=0, le=1, description="share of prompt tokens propagated past tsp_layer")
    retain_rate: float = Field(
        0.1, gt=0, le=1, description="share of prompt tokens kept in every layer's cache"
    )
    tsp_tokens: int | None = Field(None, ge=1, description="tokens propagated (constant mode)")
    retain_tokens: int | None = Field(
        None, ge=1, description="KV entries kept per head and layer (constant mode)"
    )
    window: int = Field(8, ge=1, description="observation window: last queries that score the keys")
    pooling: Pooling = "max"
    kernel: int = Field(7, ge=1, description="pooling kernel over the key axis (odd)")

    @model_validator(mode="after")
    def _check(self) -> FastKVConfig:
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd so pooling keeps the length (got {self.kernel})")
        if self.budget_mode == "constant":
            for name in ("tsp_tokens", "retain_tokens"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{name} is required when budget_mode='constant'")
                if value < self.window:
                    raise ValueError(f"{name} must be >= window ({self.window}) (got {value})")
        return self


class FastKV(Strategy):
    """FastKV (arXiv 2502.01068): token-selective propagation at a middle layer plus an
    independent, uniform KV-retention budget chosen by observation-window scores."""

    Config = FastKVConfig
    config: FastKVConfig

    def __init__(self, config: FastKVConfig, model: ModelInfo) -> None:
        super().__init__(config, model)
        tsp_layer = config.tsp_layer
        if tsp_layer is None:
            tsp_layer = min(model.num_layers - 1, round(DEFAULT_TSP_DEPTH * model.num_layers))
        if tsp_layer >= model.num_layers:
            raise ConfigError(
                f"fastkv.tsp_layer: must be below the model's {model.num_layers} layers (got {tsp_layer})"
            )
        self.tsp_layer = tsp_layer

    def _budgets(self, kind: Literal["tsp", "retain"], prompt_lengths: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.budget_mode == "constant":
            return budgets(prompt_lengths, None, getattr(c, f"{kind}_tokens"))
        return budgets(prompt_lengths, getattr(c, f"{kind}_rate"), None)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        c = self.config
        if c.budget_mode == "constant":
            return  # checked against the window when the config was built
        for kind in ("tsp", "retain"):
            rate = getattr(c, f"{kind}_rate")
            for n in prompt_lengths:
                if rate_budget(rate, n) < min(c.window, n):
                    raise ConfigError(
                        f"fastkv.window: must not exceed the {kind} budget; {kind}_rate={rate} of a "
                        f"{n}-token prompt keeps {rate_budget(rate, n)} tokens (got window={c.window})"
                    )

    @hookimpl
    def score(self, layer: LayerView) -> torch.Tensor:
        return window_scores(layer, self.config.window, self.config.pooling, self.config.kernel)

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        if scores is None:
            return None
        recent = recent_mask(layer.valid, self.config.window)
        k = self._budgets("retain", layer.prompt_lengths)
        return top_k_mask(scores, k, layer.valid[:, None], recent[:, None])

    @hookimpl
    def propagate(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        if layer.layer_idx != self.tsp_layer or scores is None:
            return None
        recent = recent_mask(layer.valid, self.config.window)
        k = self._budgets("tsp", layer.prompt_lengths)
        return top_k_mask(scores.sum(dim=1), k, layer.valid, recent)
