"""The tensors of a saved context, checked against the model and the metadata, then assembled into
a cache. Every rule a context built in memory keeps is checked here (names, dtypes, shapes,
positions within each row's length and increasing per head, the packed index, finite values),
so a damaged or hand-made file is refused with the tensor, the rule and the value, never used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache, LayerCache, PackedLayerCache
from kvpress_like.errors import ContextFileError

if TYPE_CHECKING:
    from kvpress_like.context_file import Metadata


class _Tensors:
    """Takes the file's tensors one by one, binding named sizes (``B``, ``S``, ...) on first use."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], sizes: dict[str, int]) -> None:
        self.path, self.tensors, self.sizes = path, dict(tensors), dict(sizes)

    def error(self, name: str, rule: str) -> ContextFileError:
        return ContextFileError(f"{self.path}: tensor {name!r}: {rule}")

    def take(self, name: str, dtype: torch.dtype, *dims: str) -> torch.Tensor:
        tensor = self.tensors.pop(name, None)
        if tensor is None:
            raise self.error(name, "must be present (it is missing)")
        if tensor.dtype != dtype:
            raise self.error(name, f"dtype must be {dtype} (got {tensor.dtype})")
        wanted = f"[{', '.join(dims)}]"
        if tensor.dim() != len(dims):
            raise self.error(name, f"shape must be {wanted} (got {list(tensor.shape)})")
        for dim, size in zip(dims, tensor.shape, strict=True):
            if self.sizes.setdefault(dim, size) != size:
                bound = [self.sizes.get(d, "?") for d in dims]
                raise self.error(name, f"shape must be {wanted} = {bound} (got {list(tensor.shape)})")
        return tensor

    def finish(self) -> None:
        if self.tensors:
            raise ContextFileError(
                f"{self.path}: tensors {sorted(self.tensors)}: must not be in a context file (unknown names)"
            )


def _check_positions(
    reader: _Tensors, name: str, positions: torch.Tensor, valid: torch.Tensor, ends: torch.Tensor
) -> None:
    """Valid entries' positions ``[B, Hkv, S]`` lie in ``[0, ends[b])`` and increase along S."""
    ends = ends[:, None, None]
    bad = valid & ((positions < 0) | (positions >= ends))
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise reader.error(
            name,
            f"positions must lie in [0, the row's length {int(ends.flatten()[where[0]])}) "
            f"(got {int(positions[tuple(where)])} at {where})",
        )
    last_seen = torch.where(valid, positions, -1).cummax(dim=-1).values
    before = torch.cat([torch.full_like(last_seen[..., :1], -1), last_seen[..., :-1]], dim=-1)
    bad = valid & (positions <= before)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise reader.error(
            name, f"positions must increase along each head (got a repeat or a step back at {where})"
        )


def _check_finite(
    reader: _Tensors, name: str, tensor: torch.Tensor, valid: torch.Tensor | None = None
) -> None:
    finite = torch.isfinite(tensor)
    if valid is not None:
        finite = finite.all(dim=-1) | ~valid
    if not finite.all():
        raise reader.error(name, "values must be finite (got NaN or inf)")


def _layer(
    reader: _Tensors, prefix: str, layout: str, dtype: torch.dtype, ends: torch.Tensor
) -> LayerCache | PackedLayerCache:
    def take(name: str, kind: torch.dtype, *dims: str) -> torch.Tensor:
        return reader.take(f"{prefix}.{name}", kind, *dims)

    def dense(at: str, size: str) -> LayerCache:
        valid = take(f"{at}valid", torch.bool, "B", "Hkv", size)
        layer = LayerCache(
            take(f"{at}keys", dtype, "B", "Hkv", size, "D"),
            take(f"{at}values", dtype, "B", "Hkv", size, "D"),
            take(f"{at}positions", torch.long, "B", "Hkv", size),
            valid,
        )
        for part in ("keys", "values"):
            _check_finite(reader, f"{prefix}.{at}{part}", getattr(layer, part), valid)
        return layer

    if layout == "dense":
        layer = dense("", f"{prefix}.S")
        _check_positions(reader, f"{prefix}.positions", layer.positions, layer.valid, ends)
        return layer
    n = f"{prefix}.N"
    keys, values = take("keys", dtype, n, "D"), take("values", dtype, n, "D")
    flat_positions = take("flat_positions", torch.long, n)
    index = take("index", torch.long, "B", "Hkv", f"{prefix}.S")
    prefix_valid = take("prefix_valid", torch.bool, "B", "Hkv", f"{prefix}.S")
    count = int(prefix_valid.sum())
    expected = torch.zeros_like(index)
    expected[prefix_valid] = torch.arange(count, device=index.device)
    empty = keys.shape[0] == 0 and index.numel() > 0  # nothing to point at
    if count != keys.shape[0] or not torch.equal(index, expected) or empty:
        raise reader.error(
            f"{prefix}.index",
            f"must number the {count} valid slots 0, 1, ... in order, and point "
            f"invalid ones at 0 (the packed arrays hold {keys.shape[0]} entries)",
        )
    for name, tensor in (("keys", keys), ("values", values)):
        _check_finite(reader, f"{prefix}.{name}", tensor)
    layer = PackedLayerCache(
        keys, values, flat_positions, index, prefix_valid, dense("tail.", f"{prefix}.tail")
    )
    _check_positions(reader, f"{prefix}.flat_positions", layer.positions, layer.valid, ends)
    return layer


def assemble(
    path: Path, meta: Metadata, tensors: dict[str, torch.Tensor], adapter: ModelAdapter
) -> tuple[CompressedCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache, last logits ``[B, V]``, ids ``[B, T]`` and valid mask ``[B, T]`` of a file whose
    metadata was read, on the CPU."""
    info = adapter.info
    vocab_in = adapter.model.get_input_embeddings().weight.shape[0]
    vocab_out = adapter.model.get_output_embeddings().weight.shape[0]
    sizes = {"B": meta.rows, "Hkv": info.num_kv_heads, "D": adapter.head_dim, "V": vocab_out}
    reader = _Tensors(path, tensors, sizes)
    if len(meta.layouts) != info.num_layers:
        raise ContextFileError(
            f"{path}: metadata.layouts: must name one layout per layer ({info.num_layers}) "
            f"(got {len(meta.layouts)})"
        )
    logits = reader.take("last_logits", torch.float32, "B", "V")
    _check_finite(reader, "last_logits", logits)
    ids = reader.take("ids", torch.long, "B", "T")
    valid = reader.take("valid", torch.bool, "B", "T")
    ends = reader.take("next_positions", torch.long, "B")
    if ids.numel() and not ((ids >= 0) & (ids < vocab_in)).all():
        raise reader.error("ids", f"token ids must be in [0, {vocab_in}), the model's vocabulary")
    if not torch.equal(valid.sum(dim=-1), ends) or ends.tolist() != meta.prompt_tokens or (ends < 1).any():
        raise reader.error(
            "next_positions",
            f"must equal each row's valid ids and metadata.prompt_tokens, at least 1 (got {ends.tolist()}, "
            f"valid ids {valid.sum(dim=-1).tolist()}, prompt_tokens {meta.prompt_tokens})",
        )
    layers = [
        _layer(reader, f"layers.{i}", layout, adapter.dtype, ends) for i, layout in enumerate(meta.layouts)
    ]
    reader.finish()
    kept = [layer.valid.sum(dim=-1).tolist() for layer in layers]
    if kept != meta.kept:
        wrong = next((i for i, (a, b) in enumerate(zip(kept, meta.kept, strict=False)) if a != b), None)
        found = f"{len(meta.kept)} layers" if wrong is None else f"layer {wrong}: {meta.kept[wrong]}"
        held = f"{len(kept)} layers" if wrong is None else f"{kept[wrong]}"
        raise ContextFileError(
            f"{path}: metadata.kept: must count each layer's valid entries per row and KV head "
            f"(got {found}, the tensors hold {held})"
        )
    return CompressedCache(layers, ends), logits, ids, valid
