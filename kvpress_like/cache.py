"""The compressed KV cache: per layer, the kept entries with their true positions.

Each layer holds its own number of entries (and each KV head its own choice of tokens), so
masks are built per layer from that layer's positions, never from one shared length. A slot's
index, its token's RoPE position and the row's next position are three different numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

TensorMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerCache:
    """Shapes: keys/values ``[B, Hkv, S, D]``; positions/valid ``[B, Hkv, S]``."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor  # long: RoPE position of the entry's token
    valid: torch.Tensor  # bool: False for padding and unused slots

    def extended(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ) -> LayerCache:
        """This layer plus T new entries (``keys`` ``[B, Hkv, T, D]``, ``positions``/``valid`` ``[B, T]``)."""
        heads = keys.shape[1]
        new = LayerCache(
            keys, values, positions[:, None].expand(-1, heads, -1), valid[:, None].expand(-1, heads, -1)
        )
        return self.followed_by(new)

    def followed_by(self, other: LayerCache) -> LayerCache:
        """This layer's entries, then ``other``'s (same batch and heads)."""
        pairs = zip(vars(self).values(), vars(other).values(), strict=True)
        return LayerCache(*(torch.cat(pair, dim=2) for pair in pairs))

    def broadcast_heads(self) -> LayerCache:
        """The same entries with positions/valid given per KV head (they may arrive as ``[B, 1, S]``)."""
        shape = self.keys.shape[:3]
        return LayerCache(self.keys, self.values, self.positions.expand(shape), self.valid.expand(shape))

    def select(self, keep: torch.Tensor) -> LayerCache | PackedLayerCache:
        """Only the entries where ``keep`` ``[B, Hkv, S]`` is True, in position order. When rows or
        heads keep different numbers of entries, the result is packed (no padding stored)."""
        keep = keep & self.valid  # a mask may mark padding: it must not push real entries out
        counts = keep.sum(dim=-1)
        size, total = int(counts.max()), int(counts.sum())  # syncs once per layer, in prefill only
        order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :size]
        slot = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        kept = LayerCache(
            self.keys.gather(2, slot),
            self.values.gather(2, slot),
            self.positions.gather(2, order),
            keep.gather(2, order) & self.valid.gather(2, order),
        )
        return kept if total == counts.numel() * size else PackedLayerCache.pack(kept)

    def dense(self) -> LayerCache:
        return self

    def attention_mask(
        self, query_positions: torch.Tensor, query_valid: torch.Tensor, sliding_window: int | None
    ) -> torch.Tensor:
        """Bool ``[B, Hkv, T, S]`` (True = attend): causal by true position, padding hidden, and
        the sliding window applied as transformers does (``q - k < window``). Padding queries see
        every key, so their rows never turn into NaN."""
        key_pos = self.positions[:, :, None, :]
        query_pos = query_positions[:, None, :, None]
        allowed = self.valid[:, :, None, :] & (key_pos <= query_pos)
        if sliding_window is not None:
            allowed &= query_pos - key_pos < sliding_window
        return allowed | ~query_valid[:, None, :, None]

    def kept_per_row(self) -> torch.Tensor:
        """``[B]``: valid entries per KV head, averaged over heads."""
        return self.valid.sum(dim=-1).float().mean(dim=-1)

    def nbytes_valid(self) -> torch.Tensor:
        """Bytes the valid keys and values take."""
        return self.valid.sum() * 2 * self.keys.shape[-1] * self.keys.element_size()

    def map(self, fn: TensorMap) -> LayerCache:
        """The same layer with ``fn`` applied to every tensor (a copy, a move to a device)."""
        return LayerCache(*(fn(t) for t in vars(self).values()))

    def clone(self) -> LayerCache:
        return self.map(torch.clone)


@dataclass
class PackedLayerCache:
    """Entries of every (row, KV head) stored back to back, so per-head budgets (AdaKV) and
    per-row budgets (padded batches) cost only what is kept. ``dense()`` rebuilds the padded
    ``[B, Hkv, S_max, D]`` view for one attention call; it lives only during that call.

    Shapes: keys/values ``[N, D]``, flat_positions ``[N]``, index/prefix_valid ``[B, Hkv, S_max]``
    (``index`` points into the flat arrays; invalid slots point at entry 0). Entries appended
    after prefill (one per head per token, so equal counts) go to the dense ``tail``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    flat_positions: torch.Tensor
    index: torch.Tensor
    prefix_valid: torch.Tensor
    tail: LayerCache

    @classmethod
    def pack(cls, layer: LayerCache) -> PackedLayerCache:
        valid = layer.valid
        index = (valid.flatten().cumsum(0) - 1).clamp(min=0).view_as(valid) * valid
        tail = LayerCache(
            layer.keys[:, :, :0], layer.values[:, :, :0], layer.positions[:, :, :0], valid[:, :, :0]
        )
        return cls(layer.keys[valid], layer.values[valid], layer.positions[valid], index, valid, tail)

    def dense(self) -> LayerCache:
        idx = self.index
        prefix = LayerCache(self.keys[idx], self.values[idx], self.flat_positions[idx], self.prefix_valid)
        return prefix.followed_by(self.tail)

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([self.flat_positions[self.index], self.tail.positions], dim=2)

    @property
    def valid(self) -> torch.Tensor:
        return torch.cat([self.prefix_valid, self.tail.valid], dim=2)

    def extended(self, keys, values, positions, valid) -> PackedLayerCache:
        return replace(self, tail=self.tail.extended(keys, values, positions, valid))

    def kept_per_row(self) -> torch.Tensor:
        return self.valid.sum(dim=-1).float().mean(dim=-1)

    def nbytes_valid(self) -> torch.Tensor:
        """Bytes of the stored keys and values: the packed prefix plus the tail's valid entries."""
        return self.keys.numel() * 2 * self.keys.element_size() + self.tail.nbytes_valid()

    def map(self, fn: TensorMap) -> PackedLayerCache:
        flat = (self.keys, self.values, self.flat_positions, self.index, self.prefix_valid)
        return PackedLayerCache(*(fn(t) for t in flat), self.tail.map(fn))

    def clone(self) -> PackedLayerCache:
        return self.map(torch.clone)


@dataclass
class CompressedCache:
    """All layers' kept entries plus each row's next true position."""

    layers: list[LayerCache | PackedLayerCache | None]
    next_positions: torch.Tensor  # [B] long: RoPE position of each row's next token

    def clone(self) -> CompressedCache:
        """An independent copy, so one compressed context can serve several continuations."""
        return self.map(torch.clone)

    def map(self, fn: TensorMap) -> CompressedCache:
        return CompressedCache([lc.map(fn) for lc in self.layers], fn(self.next_positions))

    def to(self, device: torch.device) -> CompressedCache:
        return self.map(lambda t: t.to(device))

    def nbytes(self) -> int:
        """Bytes of the valid keys and values over all layers."""
        return int(sum(lc.nbytes_valid() for lc in self.layers))
