"""The model's rotary embedding, run so that the model's own module is never written.

transformers' dynamic NTK and longrope RoPE recompute their frequencies inside the forward
(``dynamic_rope_update``) and store them on the module: longrope copies into ``inv_freq`` in
place, dynamic NTK replaces it and records how long a sequence it has seen (so its frequencies
depend on the calls before). Run on the model's module, a pipeline call would change the model
under a ``model.generate`` in another thread, and another call's frequencies could reach this one.
For such a module ``RotaryEmbedding`` keeps a twin (its own buffers and attributes, the config
shared) reset to the frequencies of a fresh model, and restores that state before every eager
call, under a lock: each forward computes what it would on a fresh model. Any other RoPE type is
a pure function of its input and runs on the model's module.
"""

from __future__ import annotations

import copy
import inspect
import threading

import torch
from torch import nn


def _rope_types(rotary: nn.Module) -> set[str]:
    """The module's RoPE types (one per layer type where the family has several)."""
    rope_type = getattr(rotary, "rope_type", None)
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return {t for t in types if isinstance(t, str)}


def _fresh_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with buffers and attributes of its own (the config shared), holding the
    frequencies a fresh model starts from, whatever the model has run."""
    twin = copy.copy(module)
    twin._buffers = {name: None if b is None else b.clone() for name, b in module._buffers.items()}
    for name in [n for n in twin._buffers if n.endswith("inv_freq")]:
        prefix = name.removesuffix("inv_freq")
        original = getattr(twin, f"{prefix}original_inv_freq", None)
        if original is not None:
            twin._buffers[name] = original.clone()
        if hasattr(twin, f"{prefix}max_seq_len_cached") and hasattr(twin, "original_max_seq_len"):
            setattr(twin, f"{prefix}max_seq_len_cached", twin.original_max_seq_len)
    return twin


class RotaryEmbedding:
    """(cos, sin) ``[B, T, D]`` for positions ``[B, T]``, from the model's rotary module."""

    def __init__(self, module: nn.Module) -> None:
        rope_types = _rope_types(module)
        self.by_layer_type = "layer_type" in inspect.signature(module.forward).parameters
        # dynamic NTK's update sits behind a data-dependent branch, which torch.compile cannot trace
        self.compiles = not any("dynamic" in t for t in rope_types)
        self.rewrites = any("dynamic" in t or t == "longrope" for t in rope_types)
        self.module = _fresh_twin(module) if self.rewrites else module
        if self.rewrites:
            # compiled steps write a twin of their own, so an eager call beside them never races them
            self._compiled_module = _fresh_twin(module)
            self._fresh = (dict(self.module.__dict__), dict(self.module._buffers))
            self._lock = threading.Lock()

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, layer_type: str) -> tuple:
        args = (hidden, positions, layer_type) if self.by_layer_type else (hidden, positions)
        if not self.rewrites:
            return self.module(*args)
        forward = type(self.module).forward  # not an instance's, which may be bound to the model's
        if torch.compiler.is_compiling():  # keeps its state from step to step, as transformers does
            return forward(self._compiled_module, *args)
        with self._lock:
            attributes, buffers = self._fresh
            self.module.__dict__.update(attributes)
            # dynamic NTK replaces its buffers, longrope overwrites all of inv_freq: no copies needed
            self.module._buffers = dict(buffers)
            return forward(self.module, *args)
