"""Budget settings and checks shared by the strategies that keep a number of tokens.

Budgets are rates of each row's real prompt length (``proportional``) or token counts
(``constant``). Every budget includes the ``window`` most recent tokens, which are always kept.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from kvpress_like.config import StrategyConfig
from kvpress_like.errors import ConfigError
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.plugins import Strategy
from kvpress_like.selection import Pooling, budgets, rate_budget, recent_mask, top_k_mask, window_scores


class BudgetConfig(StrategyConfig):
    """A retention budget; subclasses with more budgets list them in ``BUDGETS``."""

    BUDGETS: ClassVar[tuple[str, ...]] = ("retain",)

    budget_mode: Literal["proportional", "constant"] = Field(
        "proportional", description="budgets as rates of each prompt's length, or as token counts"
    )
    retain_rate: float = Field(0.1, gt=0, le=1, description="share of prompt tokens kept per head and layer")
    retain_tokens: int | None = Field(
        None, ge=1, description="KV entries kept per head and layer (constant mode)"
    )
    window: int = Field(8, ge=1, description="most recent tokens, always kept (and the observation window)")

    @model_validator(mode="after")
    def _check_constant_budgets(self) -> BudgetConfig:
        if self.budget_mode == "constant":
            for kind in self.BUDGETS:
                value = getattr(self, f"{kind}_tokens")
                if value is None:
                    raise ValueError(f"{kind}_tokens is required when budget_mode='constant'")
                if value < self.window:
                    raise ValueError(f"{kind}_tokens must be >= window ({self.window}) (got {value})")
        return self


class WindowScoreConfig(BudgetConfig):
    """A budget chosen by observation-window scores (``selection.window_scores``)."""

    pooling: Pooling = Field(
        "max", description="pooling of the scores over the keys before the window (the window is kept)"
    )
    kernel: int = Field(7, ge=1, description="pooling kernel over the keys before the window (odd)")

    @field_validator("kernel")
    @classmethod
    def _odd_kernel(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError("must be odd, so that pooling keeps the length")
        return kernel


class BudgetStrategy(Strategy):
    """A strategy with ``BudgetConfig`` settings: budget tensors and the prompt-length check."""

    name: ClassVar[str]
    config: BudgetConfig

    def layer_setting(self, field: str, depth: float) -> int:
        """The layer a ``field`` names, or by default the one at ``depth`` (a share of the model's
        layers); refused with a ConfigError when the model has no such layer."""
        layers = self.model.num_layers
        layer = getattr(self.config, field)
        if layer is None:
            layer = min(layers - 1, round(depth * layers))
        if layer >= layers:
            raise ConfigError(f"{self.name}.{field}: must be below the model's {layers} layers (got {layer})")
        return layer

    def budgets(self, kind: str, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Per-row budget ``[B]`` of one kind (``"retain"``, ``"tsp"``, ...)."""
        c = self.config
        if c.budget_mode == "constant":
            return budgets(prompt_lengths, None, getattr(c, f"{kind}_tokens"))
        return budgets(prompt_lengths, getattr(c, f"{kind}_rate"), None)

    def keep_best(
        self,
        scores: torch.Tensor,
        layer: LayerView,
        kind: str = "retain",
        k: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bool mask of the best entries of ``scores`` (``[B, S]`` or ``[B, H, S]``): the ``recent``
        most recent tokens per row (default: ``window``) plus the highest scores, ``k`` (default:
        the ``kind`` budget) per row."""
        k = self.budgets(kind, layer.prompt_lengths) if k is None else k
        valid = layer.valid
        recent = recent_mask(valid, self.config.window if recent is None else recent)
        if scores.dim() == 3:
            valid, recent = valid[:, None], recent[:, None]
        return top_k_mask(scores, k, valid, recent)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        c = self.config
        if c.budget_mode == "constant":
            return  # checked against the window when the config was built
        for kind in c.BUDGETS:
            rate = getattr(c, f"{kind}_rate")
            for n in prompt_lengths:
                if rate_budget(rate, n) < min(c.window, n):
                    raise ConfigError(
                        f"{self.name}.window: must not exceed the {kind} budget; {kind}_rate={rate} of a "
                        f"{n}-token prompt keeps {rate_budget(rate, n)} tokens (got window={c.window}); "
                        f"use a longer prompt, a higher {kind}_rate or a smaller window"
                    )


class WindowScoreStrategy(BudgetStrategy):
    """A strategy scored by the observation window (``selection.window_scores``); subclasses
    decide what to keep with those scores."""

    config: WindowScoreConfig

    @hookimpl
    def score(self, layer: LayerView) -> torch.Tensor:
        """Float ``[B, Hkv, S]``: the observation-window scores."""
        return window_scores(layer, self.config.window, self.config.pooling, self.config.kernel)
