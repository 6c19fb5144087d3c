from __future__ import annotations

from fractions import Fraction

import torch
from pydantic import Field

from kvpress_like.budget import WindowScoreConfig, WindowScoreStrategy
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.plugins import ModelInfo

# 1 / beta is used as the nearest fraction with at most this denominator, so that the schedule
# is computed in exact integer arithmetic (exact for integer beta up to 1000, 1.5, 2.5, 1.25, ...).
BETA_DENOMINATOR = 1000


class PyramidKVConfig(WindowScoreConfig):
    """PyramidKV settings: the uniform retention budget plus the steepness of the pyramid."""

    beta: float = Field(
        20.0,
        ge=1,
        description="pyramid steepness: the last layer keeps window + (budget - window) / beta "
        "(1 = uniform budgets)",
    )


class PyramidKV(WindowScoreStrategy):
    """PyramidKV (arXiv 2406.02069): observation-window scores with per-layer budgets that shrink
    linearly with depth and add up to the uniform budget times the number of layers.

    Schedule, per row (``n`` prompt tokens, uniform budget ``k``, ``w = min(window, n)``, ``L``
    layers), as in the paper's code: every layer keeps its ``w`` most recent tokens plus a share of
    ``a = k - w`` that is an arithmetic progression over depth with mean ``a``: the last layer gets
    ``a / beta``, the first ``first = 2a - a / beta``. When ``w + first`` would exceed ``n``, the
    pyramid is flattened to ``first = n - w`` (last ``2a - first``), which keeps it linear and keeps
    its mean. Rounding (largest remainder, exact integer arithmetic): each layer gets the floor of
    its share, and the ``L * a`` minus those floors left over (fewer than ``L``) go one each to the
    layers with the largest fractional parts, the shallower first on ties. So every layer keeps
    between ``w`` and ``n`` entries, within one of its exact share, budgets never increase with
    depth and, for every row, the ``L`` budgets add up to exactly ``L * k``, clipping included
    (``L = 1`` keeps ``k``). (Floors of cumulative sums also give the exact total but can break
    the order: shares 1.75, 1.25, 0.75, 0.25 would become 1, 2, 0, 1.) The depth axis is
    ``layer_idx`` over all ``ModelInfo.num_layers`` layers; sliding-window layers are not asked
    ``retain`` (they keep their window), so their share is simply not used. ``1 / beta`` is used
    as the nearest fraction with denominator <= 1000 (exact for integer beta up to 1000 and for
    1.5, 2.5, 1.25, ...); a huge beta thus acts as infinity: the last layer keeps only its window.
    """

    name = "pyramidkv"
    Config = PyramidKVConfig
    config: PyramidKVConfig

    def __init__(self, config: PyramidKVConfig, model: ModelInfo) -> None:
        super().__init__(config, model)
        inverse = Fraction(1 / config.beta).limit_denominator(BETA_DENOMINATOR)  # q / p
        self._p, self._q = inverse.denominator, inverse.numerator

    def layer_budgets(self, layer_idx: int, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """KV entries (per KV head) that layer ``layer_idx`` keeps for each row: long ``[B]``."""
        uniform = self.budgets("retain", prompt_lengths)
        layers = self.model.num_layers
        if layers == 1:
            return uniform
        window = prompt_lengths.clamp(max=self.config.window)[:, None]
        share = (uniform[:, None] - window).clamp(min=0)  # [B, 1]: a
        p, q = self._p, self._q
        # p * first, clipped so that the first layer keeps at most the whole prompt.
        first = torch.minimum(share * (2 * p - q), p * (prompt_lengths[:, None] - window))
        depth = torch.arange(layers, device=share.device)
        scaled = first * (layers - 1 - 2 * depth) + 2 * p * share * depth  # [B, L]: shares * p(L-1)
        whole, rest = scaled // (p * (layers - 1)), scaled % (p * (layers - 1))
        spare = layers * share - whole.sum(dim=-1, keepdim=True)  # [B, 1], in [0, L)
        order = torch.sort(rest, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, depth.expand_as(order))  # by remainder
        extra = rank[:, layer_idx : layer_idx + 1] < spare
        return (window + whole[:, layer_idx : layer_idx + 1] + extra)[:, 0]

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Bool ``[B, Hkv, S]``: per KV head, the ``window`` most recent tokens plus the best
        scores, ``layer_budgets(layer_idx)`` entries in all (ties to the earlier position)."""
        if scores is None:
            return None
        return self.keep_best(scores, layer, k=self.layer_budgets(layer.layer_idx, layer.prompt_lengths))
