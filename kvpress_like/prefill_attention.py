"""Attention kernels of prefill: causal attention over a layer's own tokens, and a chunk's
attention over the keys so far merged by log-sum-exps (chunked prefill).

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
    ``0 .. start + C``: the chunk's own keys (causal, a square) and the earlier ones (all seen) on
    the fast kernels, merged by their log-sum-exps."""
    out, lse = attention_with_lse(query, keys[:, :, start:], values[:, :, start:], scaling, causal=True)
    if start == 0:
        return out
    earlier, earlier_lse = attention_with_lse(
        query, keys[:, :, :start], values[:, :, :start], scaling, causal=False
    )
    total = torch.logaddexp(lse, earlier_lse)
    merged = out * (lse - total).exp()[..., None]  # float32 by type promotion
    merged.addcmul_(earlier, (earlier_lse - total).exp()[..., None])
    return merged.to(out.dtype)


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
    """Whether ``_attention_with_lse`` has its fused kernel here: always on CPU; on CUDA cuDNN's
    (checked once per prefill, never per chunk; without it the layers run whole)."""
    if adapter.device.type != "cuda":
        return adapter.device.type == "cpu"
    return cudnn_serves(torch.empty(0, adapter.head_dim, dtype=adapter.dtype, device=adapter.device))
