"""One forward pass over the decoder layers: the state transformers' attention calls are routed to.

``Forward.attend`` receives each layer's post-RoPE queries, keys and values (``adapter.py``),
asks the strategy's hooks what the layer keeps and which tokens go on (``contracts.HookRunner``,
prefill only), stores the layer's cache and attends (``prefill_attention.py``; where ``propagate``
answered, only the propagated queries). The pipeline walks the layers and, when ``propagate``
answered, moves on to the propagated tokens (``take_propagated``). The strategy's propagation
layer, when it runs in chunks, runs in two passes (``chunked_prefill.py``): a first one in which
``attend`` only gathers (``gather_only``, then ``LayerGathered``), and a second one on the
propagated tokens whose attention is already known (``second_pass``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpress_like.cache import CompressedCache, LayerCache
from kvpress_like.contracts import Check, HookRunner
from kvpress_like.hookspecs import LayerView
from kvpress_like.prefill_attention import (
    causal_attention,
    chunk_attention,
    lse_kernel_serves,
    selected_causal_attention,
)


class LayerGathered(Exception):
    """Raised by ``Forward.attend`` in the first pass of a propagation layer once the chunk's
    queries, keys and values are gathered: nothing after attention is needed there, so the
    decoder layer stops (``chunked_prefill.run_propagation_layer`` catches it)."""


class Forward:
    """State of one forward pass over the layers; transformers' attention calls ``attend``."""

    def __init__(
        self,
        cache: CompressedCache,
        positions: torch.Tensor,
        valid: torch.Tensor,
        hooks: HookRunner | None,
        contiguous: bool = True,
        chunk: int | None = None,
        propagation_layer: int | None = None,
    ) -> None:
        self.cache, self.hooks = cache, hooks
        self.positions, self.valid = positions, valid  # [B, T] of the tokens now in flight
        self.all_valid = bool(valid.all())
        self.contiguous = contiguous  # no token dropped: an index distance is a position distance
        self.propagated: torch.Tensor | None = None  # [B, T] bool, set by the propagate hook
        self.restart = False  # set by the restart hook: prefill again on the propagated tokens
        self.tokens_per_layer: list[torch.Tensor] = []
        self.checks: list[Check] = []  # the hook answers' value checks, verified after the pass
        self.chunk = chunk  # tokens per chunk of a chunked prefill layer (None: whole layers)
        self.in_flight: slice | None = None  # the chunk of tokens now in the layer
        self.gathered: tuple[Tensor, Tensor, Tensor | None] | None = None  # its keys, values, queries
        # The strategy's hint (Strategy.propagation_layer): where that layer would run in chunks
        # it runs in two passes (runs_in_two_passes), so that only the propagated queries attend.
        # Only a hint: attend restricts wherever propagate answers in a whole layer.
        self.propagation_layer = propagation_layer
        # The two passes (chunked_prefill.run_propagation_layer): in the first, attend gathers the
        # chunk and stops the layer, the last chunk storing the layer and keeping its queries,
        # keys, values and scaling in ``held``; in the second, ``second_pass(query, part)`` is the
        # attention, nothing is stored and no hook asked.
        self.gather_only = False
        self.held: tuple[Tensor, Tensor, Tensor, float] | None = None
        self.second_pass: Callable[[Tensor, slice], Tensor] | None = None

    def runs_in_chunks(self, layer_idx: int, layer_type: str, seq: int) -> bool:
        """Whether this layer runs in chunks: a fresh full-attention layer longer than a chunk, in
        an unpadded batch (causal by index then equals causal by position)."""
        return (
            self.chunk is not None
            and seq > self.chunk
            and layer_type == "full_attention"
            and self.all_valid
            and self.cache.layers[layer_idx] is None
        )

    def runs_in_two_passes(self, layer_idx: int, layer_type: str, seq: int) -> bool:
        """Whether this is the layer the strategy expects to propagate at, in a prefill that would
        run it in chunks: it then runs in chunks up to attention, and once more on the propagated
        tokens (``chunked_prefill.run_propagation_layer``)."""
        return (
            layer_idx == self.propagation_layer
            and self.hooks is not None
            and self.runs_in_chunks(layer_idx, layer_type, seq)
        )

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        if self.second_pass is not None:  # the propagation layer again: its attention is known
            return self.second_pass(query, self.in_flight)
        if self.in_flight is not None:  # runs_in_chunks: a full-attention layer, no window
            return self._attend_chunk(layer_idx, query, key, value, scaling)
        past = self.cache.layers[layer_idx]
        if past is None:  # prefill: these are all the keys; one position row serves every head
            layer = LayerCache(key, value, self.positions[:, None], self.valid[:, None])
        else:
            layer = past.extended(key, value, self.positions, self.valid)
        if past is not None or self.hooks is None:
            out = self._attention(query, layer.dense(), scaling, sliding_window, fresh=past is None)
            self._store(layer_idx, query, layer, scaling, sliding_window, fresh=past is None)
            return out
        # The hooks need the queries and keys, not the attention, so they are asked first: where
        # propagate answers, only the propagated tokens' outputs are used (the others are dropped
        # after this layer) and only those are computed; after a restart none is used.
        self._store(layer_idx, query, layer, scaling, sliding_window, fresh=True)
        if self.restart:
            return query.new_zeros(query.shape)
        return self._attention(query, layer, scaling, sliding_window, fresh=True, only=self.propagated)

    def _attend_chunk(self, layer_idx, query, key, value, scaling) -> torch.Tensor:
        """Attention of the chunk in flight over the layer's keys so far; the last chunk completes
        the layer (the strategy sees all its queries and keys, as without chunks). In the first
        pass of a propagation layer (``gather_only``) nothing attends: the layer stops here."""
        part, seq = self.in_flight, self.positions.shape[1]
        if part.start == 0:
            batch, heads, _, dim = query.shape
            queries = query.new_empty(batch, heads, seq, dim) if self.hooks is not None else None
            self.gathered = (
                key.new_empty(*key.shape[:2], seq, dim),
                value.new_empty(*key.shape[:2], seq, dim),
                queries,
            )
        keys, values, queries = self.gathered
        keys[:, :, part], values[:, :, part] = key, value
        if queries is not None:
            queries[:, :, part] = query
        end = part.start + query.shape[2]
        if self.gather_only:
            if end == seq:
                self._store_gathered(layer_idx, scaling)
                self.held = (queries, keys, values, scaling)
            raise LayerGathered
        out = chunk_attention(query, keys, values, part.start, scaling)
        if end == seq:
            self._store_gathered(layer_idx, scaling)
        return out

    def _store_gathered(self, layer_idx, scaling) -> None:
        keys, values, queries = self.gathered
        self.gathered = None
        layer = LayerCache(keys, values, self.positions[:, None], self.valid[:, None])
        self._store(layer_idx, queries, layer, scaling, sliding_window=None, fresh=True)

    def _store(self, layer_idx, query, layer: LayerCache, scaling, sliding_window, fresh: bool) -> None:
        """Compress the layer's entries (prefill only, when a strategy runs) and keep them."""
        self.tokens_per_layer.append(self.valid.sum(dim=-1))
        if fresh:
            layer = layer.broadcast_heads()
        if self.hooks is not None:
            layer = self._compress(layer_idx, query, layer, scaling, sliding_window)
        if fresh and sliding_window is not None:  # lossless: decoding never reaches further
            reachable = self.positions > self.cache.next_positions[:, None] - sliding_window
            layer = layer.select((self.valid & reachable)[:, None].expand_as(layer.valid))
        self.cache.layers[layer_idx] = layer

    def _attention(
        self, query, layer: LayerCache, scaling, sliding_window, fresh: bool, only: Tensor | None = None
    ) -> torch.Tensor:
        """The layer's attention ``[B, Hq, T, D]``; with ``only`` ``[B, T]`` (where plain causal
        attention applies and its kernels serve) just those queries' rows, the others zeros."""
        seq = query.shape[2]
        within_window = sliding_window is None or (self.contiguous and seq <= sliding_window)
        if fresh and within_window:
            restrict = only is not None and lse_kernel_serves(query)
            selected = only & self.valid if restrict else None

            def causal(part: tuple[slice, ...]) -> Tensor:
                q, k, v = query[part], layer.keys[part], layer.values[part]
                if selected is None:
                    return causal_attention(q, k, v, scaling)
                return selected_causal_attention(q, k, v, scaling, selected[part[0], part[2]])

            # Positions sorted along the row: plain causal attention, on the fast kernels.
            if self.all_valid:
                return causal((slice(None),) * 3)
            # Left-padded rows (prefill keeps each row's valid tokens last): one causal call per
            # row on its valid tokens, rather than a mask that would push SDPA off its fast kernels.
            out = query.new_zeros(query.shape)
            for row, n in enumerate(self.valid.sum(dim=-1).tolist()):
                if n:
                    part = (slice(row, row + 1), slice(None), slice(seq - n, seq))
                    out[part] = causal(part)
            return out
        mask = layer.attention_mask(self.positions, self.valid, sliding_window)
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
        return F.scaled_dot_product_attention(
            query, layer.keys, layer.values, attn_mask=mask, scale=scaling, enable_gqa=True
        )

    def _compress(self, layer_idx, query, layer: LayerCache, scaling, sliding_window) -> LayerCache:
        seq = layer.keys.shape[2]
        view = LayerView(
            layer_idx=layer_idx,
            num_layers=len(self.cache.layers),
            queries=query,
            keys=layer.keys,
            values=layer.values,
            positions=self.positions,
            valid=self.valid,
            prompt_lengths=self.cache.next_positions,
            scaling=scaling,
            sliding_window=sliding_window,
            parallel=self.hooks.parallel,
        )
        # Sliding-window layers are not asked to retain: they are trimmed to their window (in attend).
        keep, propagated, self.restart = self.hooks.ask(view, sliding_window is None, self.checks)
        if propagated is not None:  # the last token always goes on: it makes the logits
            self.propagated = propagated | (torch.arange(seq, device=propagated.device) == seq - 1)
        return layer if keep is None else layer.select(keep)

    def take_propagated(self) -> torch.Tensor:
        """Move on to the propagated tokens; returns the gather order ``[B, T']`` (dropped tokens
        and padding first, the rest right-aligned in position order)."""
        keep, self.propagated = self.propagated, None
        seq = keep.shape[1]
        size = int(keep.sum(dim=-1).max())  # one sync, at the TSP layer only
        order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, seq - size :]
        self.positions = self.positions.gather(1, order)
        self.valid = keep.gather(1, order) & self.valid.gather(1, order)
        self.all_valid = bool(self.valid.all())
        self.contiguous = False
        return order
