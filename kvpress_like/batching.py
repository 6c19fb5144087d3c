"""Prefilling a batch a few rows at a time (``EngineConfig.prefill_rows``): the parts' contexts
joined into the batch's, so that a batch's peak memory is its kept caches plus one part's working
set, not the whole batch's prefill activations.

A row's prefill never reads another row (attention, scores and budgets are per row), so a part
gives each of its rows what the whole batch gives it; the join pads each layer's entries to the
widest part and packs the layer again when rows or heads keep different counts.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpress_like.cache import CompressedCache, LayerCache, PackedLayerCache
from kvpress_like.results import Context, Stats


def split_rows(ids: Tensor, valid: Tensor, rows: int | None) -> list[tuple[Tensor, Tensor]]:
    """The batch's rows ``rows`` at a time (all at once for None), each part's ids ``[b, t]`` and
    valid mask cut to its own longest prompt (left padding no row of the part needs dropped)."""
    if rows is None or ids.shape[0] <= rows:
        return [(ids, valid)]
    parts = []
    for start in range(0, ids.shape[0], rows):
        part_ids, part_valid = ids[start : start + rows], valid[start : start + rows]
        width = int(part_valid.sum(dim=-1).max())
        parts.append((part_ids[:, -width:], part_valid[:, -width:]))
    return parts


def _join_layers(layers: list[LayerCache | PackedLayerCache]) -> LayerCache | PackedLayerCache:
    """One layer's entries of several parts, rows in order: dense views padded to the widest part
    with invalid slots, packed again when the (row, head) counts differ."""
    dense = [layer.dense() for layer in layers]
    width = max(d.keys.shape[2] for d in dense)

    def padded(tensor: Tensor, fill: int | bool) -> Tensor:
        extra = width - tensor.shape[2]
        if not extra:
            return tensor
        pad = (0, 0, 0, extra) if tensor.dim() == 4 else (0, extra)
        return F.pad(tensor, pad, value=fill)

    joined = LayerCache(
        *(
            torch.cat([padded(getattr(d, name), 0) for d in dense])
            for name in ("keys", "values", "positions")
        ),
        torch.cat([padded(d.valid, False) for d in dense]),
    )
    counts = joined.valid.sum(dim=-1)
    return joined if bool((counts == width).all()) else PackedLayerCache.pack(joined)


def _join_stats(stats: list[Stats]) -> Stats:
    def rows(name: str) -> list[list]:  # [layer][row] lists, rows of the parts in order
        return [list(chain(*layer)) for layer in zip(*(getattr(s, name) for s in stats), strict=True)]

    return replace(
        stats[0],
        prompt_tokens=list(chain(*(s.prompt_tokens for s in stats))),
        tokens_per_layer=rows("tokens_per_layer"),
        kv_kept_per_layer=rows("kv_kept_per_layer"),
        cache_bytes_full=sum(s.cache_bytes_full for s in stats),
        cache_bytes_kept=sum(s.cache_bytes_kept for s in stats),
        prefill_seconds=sum(s.prefill_seconds for s in stats),
    )


def join_contexts(parts: list[Context], ids: Tensor, valid: Tensor) -> Context:
    """The batch's context from its parts' (``split_rows`` order), with the batch's own ``ids`` and
    ``valid``. Each part's layer is released once joined, so at most one layer is held twice."""
    layers = []
    for index in range(len(parts[0].cache.layers)):
        layers.append(_join_layers([part.cache.layers[index] for part in parts]))
        for part in parts:
            part.cache.layers[index] = None
    cache = CompressedCache(layers, torch.cat([part.cache.next_positions for part in parts]))
    logits = torch.cat([part.last_logits for part in parts])
    first = parts[0]
    return Context(
        cache, logits, _join_stats([p.stats for p in parts]), first.source, ids, valid, first.origin
    )
