from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from kvpress_like.budget import WindowScoreConfig, WindowScoreStrategy
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.plugins import ModelInfo

# The paper puts TSP at layer 15 of Llama-3.1-8B's 32: about 47% of depth.
DEFAULT_TSP_DEPTH = 0.47


class FastKVConfig(WindowScoreConfig):
    """FastKV settings: a propagation budget (``tsp_*``) next to the retention budget."""

    BUDGETS: ClassVar[tuple[str, ...]] = ("tsp", "retain")

    tsp_layer: int | None = Field(None, ge=0, description="layer whose scores choose the propagated tokens")
    tsp_rate: float = Field(0.2, gt=0, le=1, description="share of prompt tokens propagated past tsp_layer")
    tsp_tokens: int | None = Field(None, ge=1, description="tokens propagated (constant mode)")


class FastKV(WindowScoreStrategy):
    """FastKV (arXiv 2502.01068): token-selective propagation at a middle layer plus an
    independent, uniform KV-retention budget chosen by observation-window scores."""

    name = "fastkv"
    Config = FastKVConfig
    config: FastKVConfig

    def __init__(self, config: FastKVConfig, model: ModelInfo) -> None:
        super().__init__(config, model)
        self.tsp_layer = self.layer_setting("tsp_layer", DEFAULT_TSP_DEPTH)

    def propagation_layer(self) -> int | None:
        return self.tsp_layer

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        return None if scores is None else self.keep_best(scores, layer, "retain")

    @hookimpl
    def propagate(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        if layer.layer_idx != self.tsp_layer or scores is None:
            return None
        return self.keep_best(layer.head_sum(scores), layer, "tsp")
