"""A strategy shipped as its own distribution, found by kvpress_like through its entry point."""

from __future__ import annotations

import torch

from kvpress_like import LayerView, hookimpl
from kvpress_like.budget import BudgetConfig, BudgetStrategy


class KeyNormScore:
    """Score-only plugin: keys with a small L2 norm matter most (stack it on any strategy)."""

    @hookimpl
    def score(self, layer: LayerView) -> torch.Tensor:
        """``[B, Hkv, S]``: minus the L2 norm of each key."""
        return -layer.keys.float().norm(dim=-1)


class KeyNorm(BudgetStrategy):
    """K-norm (arXiv 2406.11430): keep the keys with the lowest L2 norm, which tend to draw the
    most attention, plus the most recent tokens; no attention scores needed."""

    name = "keynorm"
    Config = BudgetConfig

    score = KeyNormScore.score

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        return None if scores is None else self.keep_best(scores, layer)
