"""GPU kernels (Triton), each with a plain-PyTorch reference that runs everywhere."""

from kvpress_like.kernels.decode_attention import decode_attention, decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
