from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpress_like.budget import BudgetConfig, BudgetStrategy
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.plugins import ModelInfo

# The paper filters at layer 13 (0-based) of Llama-3.1-8B's 32: about 41% of depth.
DEFAULT_FILTER_DEPTH = 13 / 32


class GemFilterConfig(BudgetConfig):
    """GemFilter settings: the filter layer and how many tokens it selects (``retain_*``).

    Two differences from the authors' code, each for a reason. Scores: per-head softmax by
    default (every head counts alike; raw logits summed over heads let the heads with the widest
    logit ranges decide), ``scores="logits"`` ranks as the authors do. Positions: the selected
    tokens keep their original positions in the second pass, where the authors renumber them
    0..k-1; original positions keep the distances the model was trained on between the kept
    tokens and make decoding continue at the prompt's length, as every other strategy does
    (renumbering is not offered).
    """

    filter_layer: int | None = Field(
        None, ge=0, description="layer whose last-query attention selects the tokens (None: ~41% of depth)"
    )
    retain_rate: float = Field(
        0.1, gt=0, le=1, description="share of prompt tokens selected, and so kept in every layer"
    )
    retain_tokens: int | None = Field(
        None, ge=1, description="tokens selected, and so kept in every layer (constant mode)"
    )
    # The paper forces no recent tokens in; the pipeline always keeps the last one (it makes the logits).
    window: int = Field(1, ge=1, description="most recent tokens always selected (part of the budget)")
    scores: Literal["softmax", "logits"] = Field(
        "softmax",
        description="last-query scores summed over heads: per-head softmax (default: each head counts "
        "alike) or raw scaled logits (the authors' code)",
    )


def last_query_scores(layer: LayerView, softmax: bool = True) -> torch.Tensor:
    """GemFilter's token scores, float32 ``[B, S]``: the attention of each row's last query over
    its valid keys (fp32 softmax; ``softmax=False``: the raw scaled logits), summed over every
    query head. Padding scores 0."""
    batch, kv_heads, _, dim = layer.keys.shape
    query = layer.queries[:, :, -1].reshape(batch, kv_heads, layer.num_kv_groups, dim)
    # Products in the cache's dtype (fp32 accumulation), softmax in fp32: no fp32 copy of the keys.
    logits = torch.einsum("bhgd,bhsd->bhgs", query, layer.keys).float() * layer.scaling
    # The last query is the row's newest token: every valid key is at or before its position.
    padding = ~layer.valid[:, None, None]
    if not softmax:
        return layer.head_sum(logits.masked_fill(padding, 0.0).sum(dim=2))
    return layer.head_sum(torch.softmax(logits.masked_fill(padding, float("-inf")), dim=-1).sum(dim=2))


class GemFilter(BudgetStrategy):
    """GemFilter (arXiv 2409.17422): an early filter layer's last-query attention selects the
    prompt tokens, and the whole model then runs again on those tokens only.

    Prefill runs up to ``filter_layer``; there the attention of the last query (summed over all
    heads) picks the ``retain`` budget of each row, the ``window`` most recent tokens included,
    in position order. ``restart`` then makes the pipeline prefill again from layer 0 on the
    selected tokens, at their original positions, keeping every entry: the KV cache of every
    layer is the selected set. The first pass's caches are dropped. GemFilter ranks with its own
    last-query scores: a plugin's ``score`` answer is not used.
    """

    name = "gemfilter"
    Config = GemFilterConfig
    config: GemFilterConfig

    def __init__(self, config: GemFilterConfig, model: ModelInfo) -> None:
        super().__init__(config, model)
        self.filter_layer = self.layer_setting("filter_layer", DEFAULT_FILTER_DEPTH)

    def propagation_layer(self) -> int | None:
        return self.filter_layer  # restarts there: the layer's attention is skipped

    @hookimpl
    def propagate(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        if layer.layer_idx != self.filter_layer:
            return None
        scores = last_query_scores(layer, softmax=self.config.scores == "softmax")
        return self.keep_best(scores, layer, "retain")

    @hookimpl
    def restart(self, layer: LayerView) -> bool | None:
        return True if layer.layer_idx == self.filter_layer else None
