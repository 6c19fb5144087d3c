"""Attention kernels of prefill: causal attention over a layer's own tokens, a chunk's attention
over the keys so far merged by log-sum-exps (chunked prefill), and causal attention of selected
queries only (the layer where tokens are propagated).

flash-attn when installed for this GPU (``flash.py``), else cuDNN's fused kernel called directly
where it serves the inputs, else SDPA's own choice. cuDNN is called directly rather than by
reordering SDPA's backends (``sdpa_kernel``), which are process-wide state that another thread's
attention would see. On an H200 (bf16, 32 query / 8 KV heads, head dim 128) the direct call and
SDPA with cuDNN first give identical outputs, at 678 vs 597 TFLOP/s for 32K tokens and 559 vs
559 TFLOP/s for 128K (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpress_like import flash
from kvpress_like.adapter import ModelAdapter

# Queries per block of ``selected_causal_attention``: each block attends over itself in full
# (T * block / 2 in all), so a smaller block does less work but makes more, smaller kernel calls.
# On an H200 (bf16, 32 query / 8 KV heads, head dim 128, 20% of the queries selected at random)
# 4096 was the best of 2K-16K: 65 ms at 128K tokens (causal attention of every query: 246 ms),
# 6.0 ms at 32K (15.1 ms); 8192 took 69 and 6.9 ms, 16384 76 and 8.8 ms.
SELECTED_BLOCK = 4096
# A block's selected queries attend over the earlier keys in a call whose query count is rounded
# up to a multiple of this (the last selected query repeated, its copies dropped), so that the
# shapes recur from prompt to prompt. cuDNN builds an execution plan for each new shape
# (flashinfer measured 55-70 ms per build on SM100), and how many queries a block selects depends
# on the prompt: unrounded, a new 128K row can bring 31 new shapes. H200, 32K x16 in 4-row parts:
# 2.81-2.96 s a part rounded, 2.81 then 3.91-4.46 s unrounded (docs/performance.md, session 18;
# session 17 logged the GPU idle ~1.5 s of each such part). The count is capped at the block's
# queries: only a block shorter than the rounded count (a prompt's last) sends a count of its own,
# as its own causal call does anyway. 1 turns the rounding off; it must be >= 1.
SELECTED_BUCKET = 128


def causal_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float) -> Tensor:
    """Causal attention ``[B, Hq, T, D]`` over as many keys as queries: flash-attn when installed
    for this GPU (and faster there than cuDNN), else cuDNN's fused kernel where it serves these
    inputs, else SDPA's own choice. cuDNN is called directly rather than by reordering SDPA's
    backends, which is process-wide state another thread's attention would see."""
    out = flash.causal_attention(query, keys, values, scaling)
    if out is not None:
        return out
    if query.is_cuda and cudnn_serves(query):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, False, 0.0, query.shape[2] > 1, False, scale=scaling
        )[0]
    if (
        query.is_cuda
        and keys.shape[1] != query.shape[1]
        and query.dtype not in (torch.float16, torch.bfloat16)
    ):
        # SDPA's fused CUDA kernels take grouped KV heads only in half precision: fp32 with
        # enable_gqa falls to the math kernel, a [B, Hq, T, T] score matrix (2.4 GiB per row at 8K
        # tokens and 9 heads). Repeated heads keep it on the memory-efficient kernel.
        groups = query.shape[1] // keys.shape[1]
        keys, values = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
    return F.scaled_dot_product_attention(
        query, keys, values, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=True
    )


def chunk_attention(query: Tensor, keys: Tensor, values: Tensor, start: int, scaling: float) -> Tensor:
    """Causal attention ``[B, Hq, C, D]`` of the ``C`` queries at indices ``start..`` over the keys
    ``0 .. start + C`` (later keys, gathered or not yet, are ignored): the chunk's own keys (causal,
    a square) and the earlier ones (all seen) on the fast kernels, merged by their log-sum-exps."""
    end = start + query.shape[2]
    out, lse = attention_with_lse(query, keys[:, :, start:end], values[:, :, start:end], scaling, causal=True)
    if start == 0:
        return out
    earlier, earlier_lse = attention_with_lse(
        query, keys[:, :, :start], values[:, :, :start], scaling, causal=False
    )
    return merge_by_lse(out, lse, earlier, earlier_lse)


def merge_by_lse(out: Tensor, lse: Tensor, other: Tensor, other_lse: Tensor) -> Tensor:
    """The attention over two disjoint sets of keys, from each set's attention ``[..., T, D]`` and
    log-sum-exp ``[..., T]`` (float32): each weighted by its share of the total softmax mass."""
    total = torch.logaddexp(lse, other_lse)
    merged = out * (lse - total).exp()[..., None]  # float32 by type promotion
    merged.addcmul_(other, (other_lse - total).exp()[..., None])
    return merged.to(out.dtype)


def lse_kernel_serves(tensor: Tensor) -> bool:
    """Whether ``attention_with_lse`` (under ``chunk_attention`` and ``selected_causal_attention``)
    has its fused kernel for inputs like ``tensor``: the CPU flash kernel, or cuDNN's on CUDA."""
    return tensor.device.type == "cpu" or (tensor.is_cuda and cudnn_serves(tensor))


def selected_causal_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    scaling: float,
    selected: Tensor,
    block: int | None = None,
    packed: bool = False,
) -> Tensor:
    """Causal attention ``[B, Hq, T, D]`` (as ``causal_attention``) of only the queries where
    ``selected`` ``[B, T]`` is True; the other rows are zeros. ``packed``: the selected rows only,
    ``[B, Hq, S, D]`` with ``S`` the most any row selects, each row's in query order and
    right-aligned, zeros before (the order of ``Forward.take_propagated``).

    The queries go in blocks of ``block`` (default ``SELECTED_BLOCK``): all of a block's queries
    over its own keys (causal, a square, cheap), of which the selected rows are kept and attend
    over the earlier keys (all seen), the two merged by log-sum-exps as in ``chunk_attention``.
    With a share ``r`` of the queries selected the work is about ``T * (block + r * T) / 2`` dot
    products instead of ``T * T / 2``, on the fused kernels, with no mask. Rows select different
    queries, so each row goes on its own (two host syncs per row: prefill, one layer)."""
    block = block or SELECTED_BLOCK
    seq = query.shape[2]
    picks = [row.nonzero().flatten() for row in selected]  # query indices, ascending
    size = max(p.numel() for p in picks) if packed else seq
    out = query.new_zeros(*query.shape[:2], size, query.shape[3])
    starts = torch.arange(0, seq, block, device=selected.device)
    for row, picked in enumerate(picks):
        cuts = [*torch.searchsorted(picked, starts).tolist(), picked.numel()]
        q, k, v = (t[row : row + 1] for t in (query, keys, values))
        offset = size - picked.numel()  # packed rows are right-aligned
        for start, first, last in zip(starts.tolist(), cuts[:-1], cuts[1:], strict=True):
            if first == last:
                continue  # no selected query in this block
            rows = picked[first:last] - start
            end = min(start + block, seq)
            own, lse = attention_with_lse(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], scaling, causal=True
            )
            own, lse = own.index_select(2, rows), lse.index_select(2, rows)
            if start > 0:
                earlier, earlier_lse = attention_with_lse(
                    q[:, :, start:end].index_select(2, _bucketed(rows, end - start)),
                    k[:, :, :start], v[:, :, :start], scaling, causal=False,
                )  # fmt: skip
                count = rows.numel()
                own = merge_by_lse(own, lse, earlier[:, :, :count], earlier_lse[:, :, :count])
            if packed:
                out[row, :, offset + first : offset + last] = own[0]
            else:
                out[row].index_copy_(1, rows + start, own[0])
    return out


def _bucketed(rows: Tensor, most: int) -> Tensor:
    """``rows`` ``[n]`` padded with copies of its last index to a multiple of ``SELECTED_BUCKET``
    (at most ``most``): a query count that recurs from prompt to prompt."""
    size = min(-(-rows.numel() // SELECTED_BUCKET) * SELECTED_BUCKET, most)
    return torch.cat([rows, rows[-1:].expand(size - rows.numel())]) if size > rows.numel() else rows


def attention_with_lse(
    query: Tensor, keys: Tensor, values: Tensor, scaling: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """Attention ``[B, Hq, T, D]`` (GQA: KV heads shared by groups of query heads) and its natural
    log-sum-exp ``[B, Hq, T]`` in float32: cuDNN's fused kernel on CUDA, the flash kernel on CPU."""
    if keys.shape[2] == 1:  # one key (cuDNN takes none such): every query takes its value
        groups = query.shape[1] // keys.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
        lse = (query.float() * key.float()).sum(dim=-1) * scaling
        return value.expand_as(query).to(query.dtype), lse
    if query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, True, 0.0, causal, False, scale=scaling
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, causal, scale=scaling
        )
    return out, lse.reshape(query.shape[:3])


def cudnn_serves(tensor: Tensor) -> bool:
    """Whether cuDNN's fused attention takes these CUDA inputs: fp16/bf16, head sizes up to 128 in
    multiples of 8, compute capability 8 or above, and cuDNN attention not switched off."""
    head_dim = tensor.shape[-1]
    return (
        tensor.dtype in (torch.float16, torch.bfloat16)
        and head_dim <= 128
        and head_dim % 8 == 0
        and torch.cuda.get_device_capability(tensor.device)[0] >= 8
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


def chunk_kernels_available(adapter: ModelAdapter) -> bool:
    """Whether ``attention_with_lse`` has its fused kernel for this model's layers (checked once per
    prefill, never per chunk; without it the layers run whole)."""
    return lse_kernel_serves(torch.empty(0, adapter.head_dim, dtype=adapter.dtype, device=adapter.device))
