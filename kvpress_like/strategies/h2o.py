from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.budget import BudgetConfig, BudgetStrategy
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.selection import budgets


class H2OConfig(BudgetConfig):
    """H2O settings: the retention budget holds recent tokens plus heavy hitters.

    As in the paper, ``recent_share`` 0.5 gives half of each row's budget to its most recent tokens
    (at least ``window``) and the other half to heavy hitters. ``recent_share=None`` keeps only
    ``window`` recent tokens and gives heavy hitters the rest, like the other budget strategies.
    Either way the same ``retain_rate`` means the same cache size across strategies.
    """

    window: int = Field(8, ge=1, description="most recent tokens always kept (the least recent share)")
    recent_share: float | None = Field(
        0.5,
        gt=0,
        le=1,
        description="share of each row's budget for its most recent tokens, rounded half up (the "
        "paper: 0.5); None: only `window` recent tokens, heavy hitters fill the rest",
    )
    chunk_size: int = Field(
        512,
        ge=1,
        description="prompt queries per step of the accumulation (2 fp32 buffers of B x Hq x chunk x S)",
    )


def accumulated_attention(layer: LayerView, chunk_size: int) -> torch.Tensor:
    """Attention each key receives, summed over every prompt query: float32 ``[B, Hkv, S]``.

    Causal by true position, padding keys masked, fp32 softmax; padding queries add nothing.
    Summed over the query heads of each KV group. Queries go ``chunk_size`` at a time, so the
    extra memory is two fp32 ``[B, Hq, chunk, S]`` buffers rather than the full ``[B, Hq, T, S]``.
    """
    keys = layer.keys  # [B, Hkv, S, D]; products in its dtype (fp32 accumulation), no fp32 copy
    batch, kv_heads, seq, dim = keys.shape
    groups = layer.num_kv_groups
    queries = layer.queries.reshape(batch, kv_heads, groups, -1, dim)  # [B, Hkv, G, T, D], head h -> h // G
    key_pos, key_valid = layer.positions, layer.valid  # [B, S]
    total = keys.new_zeros(batch, kv_heads, groups, seq, dtype=torch.float32)
    for start in range(0, queries.shape[3], chunk_size):
        stop = start + chunk_size
        query_pos, query_valid = layer.positions[:, start:stop], layer.valid[:, start:stop]  # [B, C]
        allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])  # [B, C, S]
        chunk = queries[:, :, :, start:stop]
        logits = torch.einsum("bhgcd,bhsd->bhgcs", chunk, keys).float()  # [B, Hkv, G, C, S]
        logits.mul_(layer.scaling).masked_fill_(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # in place above and below: two chunk-sized buffers
        total += probs.masked_fill_(~query_valid[:, None, None, :, None], 0.0).sum(dim=-2)  # padding: 0
    return total.sum(dim=2)


class H2O(BudgetStrategy):
    """H2O (arXiv 2306.14048): every layer keeps, per KV head, the most recent tokens plus the heavy
    hitters, the keys with the most attention accumulated over all prompt queries, up to a budget.

    ``score``: float32 ``[B, Hkv, S]``, see ``accumulated_attention`` (causal, padding masked,
    fp32 softmax, summed over all valid queries and over each KV group's query heads; computed
    ``chunk_size`` queries at a time, never as a whole ``S x S`` matrix).
    ``retain``: bool ``[B, Hkv, S]``; per row and KV head, the row's recent share of its budget
    (``recent_share``, at least ``window``) as its most recent tokens, plus the highest accumulated
    attention up to the row's retention budget (ties to the earlier position). Causal accumulation
    favours early keys (more queries see them), as in the paper.
    """

    name = "h2o"
    Config = H2OConfig
    config: H2OConfig

    @hookimpl
    def score(self, layer: LayerView) -> torch.Tensor | None:
        if layer.sliding_window is not None:
            return None  # retain is not asked there (the window is kept losslessly): spare the S x S work
        return accumulated_attention(layer, self.config.chunk_size)

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        if scores is None:
            return None
        share = self.config.recent_share
        if share is None:
            return self.keep_best(scores, layer, "retain")
        budget = self.budgets("retain", layer.prompt_lengths)  # [B]
        # The share of each row's budget, rounded half up like the budgets, at least ``window``.
        recent = torch.minimum(budgets(budget, share, None).clamp(min=self.config.window), budget)
        return self.keep_best(scores, layer, "retain", k=budget, recent=recent)
