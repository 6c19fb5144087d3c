"""The compressed KV cache: per layer, the kept entries with their true positions.

Each layer holds its own number of entries (and each KV head its own choice of tokens), so
masks are built per layer from that layer's positions, never from one shared length. A slot's
index, its token's RoPE position and the row's next position are three different numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """Shapes: keys/values ``[B, Hkv, S, D]``; positions/valid ``[B, Hkv, S]``."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor  # long: RoPE position of the entry's token
    valid: torch.Tensor  # bool: False for padding and unused slots

    def extended(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ):
        """This layer plus T new entries (``keys`` ``[B, Hkv, T, D]``, ``positions``/``valid`` ``[B, T]``)."""
        heads = keys.shape[1]
        new_pos = positions[:, None].expand(-1, heads, -1)
        new_valid = valid[:, None].expand(-1, heads, -1)
        return LayerCache(
            torch.cat([self.keys, keys], dim=2),
            torch.cat([self.values, values], dim=2),
            torch.cat([self.positions, new_pos], dim=2),
            torch.cat([self.valid, new_valid], dim=2),
        )

    def broadcast_heads(self) -> LayerCache:
        """The same entries with positions/valid given per KV head (they may arrive as ``[B, 1, S]``)."""
        shape = self.keys.shape[:3]
        return LayerCache(self.keys, self.values, self.positions.expand(shape), self.valid.expand(shape))

    def select(self, keep: torch.Tensor) -> LayerCache:
        """Only the entries where ``keep`` ``[B, Hkv, S]`` is True, in position order; rows with
        fewer kept entries than the longest get invalid slots at the end."""
        size = int(keep.sum(dim=-1).max())  # one sync per layer, in prefill only
        order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :size]
        slot = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        return LayerCache(
            self.keys.gather(2, slot),
            self.values.gather(2, slot),
            self.positions.gather(2, order),
            keep.gather(2, order) & self.valid.gather(2, order),
        )

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
        per_entry = 2 * self.keys.shape[-1] * self.keys.element_size()
        return self.valid.sum() * per_entry


def empty_layer(batch: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> LayerCache:
    return LayerCache(
        torch.empty(batch, heads, 0, dim, dtype=dtype, device=device),
        torch.empty(batch, heads, 0, dim, dtype=dtype, device=device),
        torch.empty(batch, heads, 0, dtype=torch.long, device=device),
        torch.empty(batch, heads, 0, dtype=torch.bool, device=device),
    )


@dataclass
class CompressedCache:
    """All layers' kept entries plus each row's next true position."""

    layers: list[LayerCache | None]
    next_positions: torch.Tensor  # [B] long: RoPE position of each row's next token

    def clone(self) -> CompressedCache:
        """An independent copy, so one compressed context can serve several continuations."""
        layers = [
            None if lc is None else LayerCache(*(t.clone() for t in vars(lc).values())) for lc in self.layers
        ]
        return CompressedCache(layers, self.next_positions.clone())

    def nbytes(self) -> int:
        """Bytes of the valid keys and values over all layers."""
        return int(sum(lc.nbytes_valid() for lc in self.layers if lc is not None))
