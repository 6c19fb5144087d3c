from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.budget import WindowScoreConfig, WindowScoreStrategy
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.selection import Pooling


class SnapKVConfig(WindowScoreConfig):
    """SnapKV settings: one retention budget chosen by observation-window scores.

    Defaults follow SnapKV's reference code (FasterDecoding/SnapKV, ``init_snapkv``), which kvpress'
    ``SnapKVPress`` also uses: average pooling with kernel 5. Its observation window is 32 (64 in
    kvpress); we keep the library's window of 8 because the window is also the recent part of the
    budget and must fit in it: with 32, a 10% budget would refuse every prompt under 315 tokens.
    """

    pooling: Pooling = Field("avg", description="pooling over the key axis (SnapKV's code: avg)")
    kernel: int = Field(5, ge=1, description="pooling kernel over the key axis (odd; SnapKV's code: 5)")


class SnapKV(WindowScoreStrategy):
    """SnapKV (arXiv 2404.14469): every layer keeps, per KV head, the most recent tokens plus the
    keys that the last ``window`` queries of the prompt attend to most, up to a uniform budget.

    ``score``: float32 ``[B, Hkv, S]``; the last ``window`` queries attend to all keys (causal by
    true position, padding masked, fp32 softmax), summed over those queries, pooled over keys,
    summed over the query heads of each KV group (GQA: one choice per KV head, so the cache keeps
    the model's KV-head count).
    ``retain``: bool ``[B, Hkv, S]``; per row and KV head, the ``window`` most recent tokens plus
    the best scores up to the row's retention budget (ties go to the earlier position).
    No propagation: every layer runs on the whole prompt.
    """

    name = "snapkv"
    Config = SnapKVConfig
    config: SnapKVConfig

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        return None if scores is None else self.keep_best(scores, layer, "retain")
