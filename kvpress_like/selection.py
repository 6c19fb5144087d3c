"""Selection math shared by strategies: observation-window scores, budgets, top-k masks.

Every function is plain tensor code with no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kvpress_like.hookspecs import LayerView

Pooling = Literal["max", "avg"]


def window_scores(layer: LayerView, window: int, pooling: Pooling, kernel: int) -> torch.Tensor:
    """SnapKV-style importance of every key, GQA-aware: float32 ``[B, Hkv, S]``.

    The last ``window`` queries attend to all keys (causal by true position, padding masked),
    softmax in fp32, summed over those queries; the keys before the window (the prefix) are pooled
    over the key axis among themselves (odd ``kernel``, stride 1, zero-padded at both ends; ``avg``
    divides by the kernel), as SnapKV's Algorithm 1 and FastKV's and kvpress' code do: the window's
    own keys are kept regardless and keep their unpooled sums, so the keys just before the window
    cannot borrow its high scores. Then summed over the query heads of each KV group.
    """
    keys = layer.keys
    batch, kv_heads, seq, dim = keys.shape
    groups = layer.num_kv_groups
    window = min(window, seq)
    queries = layer.queries[:, :, -window:].reshape(batch, kv_heads, groups, window, dim)
    query_pos = layer.positions[:, -window:]
    query_valid = layer.valid[:, -window:]

    # Products in the cache's dtype (fp32 accumulation), softmax in fp32: no fp32 copy of the keys.
    logits = torch.einsum("bhgwd,bhsd->bhgws", queries, keys).float() * layer.scaling
    allowed = layer.valid[:, None, :] & (layer.positions[:, None, :] <= query_pos[:, :, None])  # [B, w, S]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # Padding queries (rows shorter than the window) contribute nothing, not NaN.
    probs = torch.where(query_valid[:, None, None, :, None], probs, 0.0)
    summed = probs.sum(dim=-2)  # [B, Hkv, G, S]

    prefix = seq - window  # rows are right-aligned: the last ``window`` slots are every row's window
    if kernel > 1 and prefix > 0:
        flat = summed[..., :prefix].reshape(batch * kv_heads * groups, 1, prefix)
        if pooling == "max":
            flat = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
        else:
            flat = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
        summed = torch.cat([flat.reshape(batch, kv_heads, groups, prefix), summed[..., prefix:]], dim=-1)
    return summed.sum(dim=2)


def rate_budget(rate: float, length: int) -> int:
    """Tokens a rate of a prompt length buys: rounded half up, at most the length."""
    return min(length, math.floor(rate * length + 0.5))


def budgets(prompt_lengths: torch.Tensor, rate: float | None, tokens: int | None) -> torch.Tensor:
    """Per-row budgets ``[B]``: ``rate`` of each prompt length (proportional) or ``tokens`` (constant)."""
    if tokens is not None:
        return prompt_lengths.clamp(max=tokens)
    return torch.minimum(prompt_lengths, (prompt_lengths.double() * rate + 0.5).floor().long())


def recent_mask(valid: torch.Tensor, window: int | torch.Tensor) -> torch.Tensor:
    """The last ``window`` entries (one count, or one per row ``[B]``) of each right-aligned row
    ``[B, S]`` (padding excluded)."""
    seq = valid.shape[-1]
    if isinstance(window, torch.Tensor):
        window = window[:, None]
    return valid & (torch.arange(seq, device=valid.device) >= seq - window)


def top_k_mask(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Bool mask of the ``k[b]`` best entries of each row of ``scores [B, ..., S]``.

    ``valid`` and ``keep`` broadcast to ``scores``: invalid entries are never chosen, ``keep``
    entries always are (they count towards the budget). Ties go to the earlier position.
    """
    ranked = scores.float().masked_fill(~valid, float("-inf")).masked_fill(keep, float("inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    seq = scores.shape[-1]
    k = k.view(-1, *([1] * (scores.dim() - 1)))
    chosen_rank = torch.arange(seq, device=scores.device) < k
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, order, chosen_rank.expand_as(order))
    return chosen & valid
