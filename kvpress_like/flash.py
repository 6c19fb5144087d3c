"""flash-attn as an optional prefill backend: used when importable, never required.

FlashAttention-3 (``flash_attn_interface``, built for Hopper) is taken on GPUs of compute capability
9.x; FlashAttention-2 (``flash_attn``) below that only: on Hopper SDPA's cuDNN kernel is faster than
FA2-class kernels (about 600 vs 350 TFLOP/s for causal prefill on an H200, docs/performance.md).
Anything else (no package, a broken install, CPU tensors, fp32, head dim above 256) leaves the
call to SDPA.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

# (module, minimum and maximum compute capability major version it is taken on)
CANDIDATES = (("flash_attn_interface", 9, 9), ("flash_attn", 8, 8))


@functools.cache
def causal_kernel(capability_major: int) -> Callable | None:
    """The ``flash_attn_func`` to use on a GPU of this capability, or None."""
    for module_name, low, high in CANDIDATES:
        if not low <= capability_major <= high:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception:  # absent or broken (e.g. built for another torch): SDPA serves
            continue
        kernel = getattr(module, "flash_attn_func", None)
        if kernel is not None:
            return kernel
    return None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
    """Causal self-attention through flash-attn, or None when it does not serve these inputs.

    Shapes as SDPA's: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, T, D]`` (GQA: Hq % Hkv == 0),
    result ``[B, Hq, T, D]``. flash-attn takes ``[B, T, H, D]`` and repeats no KV heads itself.
    """
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] > 256:
        return None
    kernel = causal_kernel(torch.cuda.get_device_capability(query.device)[0])
    if kernel is None:
        return None
    out = kernel(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scale, causal=True
    )
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE
    return out.transpose(1, 2)
