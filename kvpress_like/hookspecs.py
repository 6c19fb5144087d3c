"""Every hook point of kvpress_like, declared once.

Shapes: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv per group), T queries in this
forward, S keys at this layer (S == T during prefill), D head dim.

All hooks are called during prefill only, once per decoder layer, right after the layer's
keys and values are computed (post-RoPE). They are ``firstresult``: plugins are asked newest first
and the first answer that is not ``None`` wins, so a plugin registered on top of a strategy can
override one hook (say ``score``) and leave the others to the strategy. ``None`` from every plugin
means "no opinion": no scores, keep every entry, propagate every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pluggy
import torch

from kvpress_like.parallel import TensorParallel

PROJECT = "kvpress_like"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class LayerView:
    """What a hook sees of one decoder layer during prefill.

    Valid entries of each row are right-aligned (padding and dropped tokens come first) and
    sorted by position, so the last ``w`` entries of a row are its ``w`` most recent tokens.

    Under tensor parallelism (``parallel.py``) a rank sees its own heads only: ``Hq`` and ``Hkv``
    are the rank's. A choice over every head goes through ``head_sum`` or ``all_heads``, so that
    every rank makes the same one.
    """

    layer_idx: int
    num_layers: int
    queries: torch.Tensor  # [B, Hq, T, D] post-RoPE
    keys: torch.Tensor  # [B, Hkv, S, D] post-RoPE, not repeated over the group
    values: torch.Tensor  # [B, Hkv, S, D]
    positions: torch.Tensor  # [B, S] long: true position of each key in the prompt
    valid: torch.Tensor  # [B, S] bool: False for padding
    prompt_lengths: torch.Tensor  # [B] long: real prompt tokens per row (budgets are rates of this)
    scaling: float  # softmax scale the layer uses
    sliding_window: int | None  # the layer's attention window, None for full attention
    parallel: TensorParallel = field(default_factory=TensorParallel)  # the ranks sharing the heads

    @property
    def num_kv_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def head_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, S]`` -> ``[B, S]``: the sum over every KV head, of all ranks."""
        return self.parallel.sum(values.sum(dim=1))

    def all_heads(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, ...]`` -> the same for every KV head of all ranks, in head order."""
        return self.parallel.gather_heads(values)

    def local_heads(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, all KV heads, ...]`` -> this rank's ``[B, Hkv, ...]``."""
        return self.parallel.local_heads(values)


class StrategySpec:
    """The hook points a strategy may implement."""

    @hookspec(firstresult=True)
    def score(self, layer: LayerView) -> torch.Tensor | None:
        """Importance of every key at this layer.

        Returns float ``[B, Hkv, S]`` (higher is more important), or None to defer. Scores of
        padding entries are ignored.
        """

    @hookspec(firstresult=True)
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Which KV entries this layer keeps in its cache for decoding.

        ``scores`` is the winning ``score`` answer (``[B, Hkv, S]``) or None. Returns bool
        ``[B, Hkv, S]`` (True = keep), or None to defer; None from all plugins keeps everything.
        Sliding-window layers are not asked: they keep exactly the entries their window can
        still reach, which is lossless.
        """

    @hookspec(firstresult=True)
    def propagate(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Which tokens go on to the next layer.

        Returns bool ``[B, S]`` (True = the token's hidden state, after this layer's MLP, goes on
        with its original position), or None to defer; None from all plugins propagates every
        token. The last token of each row is always propagated: its hidden state makes the logits.
        """

    @hookspec(firstresult=True)
    def restart(self, layer: LayerView) -> bool | None:
        """Whether to drop this prefill pass and run it again from layer 0 on the tokens just
        chosen by ``propagate`` only, with their original positions (GemFilter). Asked only at a
        layer where ``propagate`` answered; the second pass asks no hooks and keeps every entry.
        """
