from __future__ import annotations

import torch
from pydantic import Field

from kvpress_like.budget import WindowScoreConfig, WindowScoreStrategy
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.selection import recent_mask, top_k_mask


class AdaKVConfig(WindowScoreConfig):
    """Ada-KV settings: the uniform retention budget plus the per-head safeguard."""

    floor: float = Field(
        0.2,
        ge=0,
        le=1,
        description="share of the uniform budget (beyond the window) every KV head keeps of its own "
        "best entries before the rest is allocated across heads (0 = fully adaptive, 1 = uniform)",
    )


class AdaKV(WindowScoreStrategy):
    """Ada-KV (arXiv 2407.11550): observation-window scores with the layer's budget allocated
    adaptively across KV heads, by one top-k over the scores of all heads jointly.

    Per row (``n`` prompt tokens, uniform budget ``k``, ``w = min(window, n)``, ``H`` KV heads), as
    in the paper's code, the window is kept outside the allocation: every head keeps its ``w`` most
    recent tokens, then (the safeguard) its own ``f = floor(floor * (k - w))`` best other entries,
    then the remaining ``H * (k - w - f)`` entries of the layer are the best scores among all heads'
    entries not yet kept, compared jointly. A head whose scores are concentrated on a few high
    entries thus gives its share to heads that spread their attention. Each head keeps at least
    ``w + f`` entries and the heads of a row keep exactly ``H * k`` together (``k >= w`` always,
    see ``check_prompt``). Ties go to the earlier entry: within a head the earlier position, in
    the joint top-k the lower head, then the earlier position (a stable sort of ``[H * S]``).
    """

    name = "adakv"
    Config = AdaKVConfig
    config: AdaKVConfig

    def head_budgets(self, prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row ``[B]`` (long): entries each KV head keeps for sure (window + safeguard), and
        the mean entries per KV head (the uniform budget; the layer keeps ``Hkv`` times that)."""
        uniform = self.budgets("retain", prompt_lengths)
        window = prompt_lengths.clamp(max=self.config.window)
        share = (uniform - window).clamp(min=0)
        guaranteed = window + (share.double() * self.config.floor).floor().long()
        return guaranteed, window + share

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Bool ``[B, Hkv, S]``: per head the window and the safeguard, then the joint top-k;
        per-head counts differ, their sum per row is ``Hkv * budget``."""
        if scores is None:
            return None
        scores = layer.all_heads(scores)  # the budget is shared by every head, of all ranks
        batch, heads, seq = scores.shape
        guaranteed, mean = self.head_budgets(layer.prompt_lengths)
        valid = layer.valid[:, None].expand(batch, heads, seq)
        recent = recent_mask(layer.valid, self.config.window)[:, None]
        floor = top_k_mask(scores, guaranteed, valid, recent)  # [B, Hkv, S]
        flat = scores.reshape(batch, heads * seq)
        candidates = (valid & ~floor).reshape(batch, heads * seq)
        joint = top_k_mask(flat, heads * (mean - guaranteed), candidates, torch.zeros_like(candidates))
        return layer.local_heads(floor | joint.reshape(batch, heads, seq))
