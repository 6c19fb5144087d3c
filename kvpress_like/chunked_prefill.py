"""Chunked prefill of one decoder layer, and the propagation layer's two passes.

``run_in_chunks``: a full-attention layer of a fresh, unpadded prefill runs ``fwd.chunk`` tokens at
a time, so transformers' per-token work and its activations stay chunk-sized; ``Forward.attend``
gathers the layer's keys as they come and attends each chunk over the keys so far.

``run_propagation_layer``: the layer at which the strategy expects to propagate
(``Strategy.propagation_layer``), where it would run in chunks. Only the propagated tokens' outputs
go on after it, so only their queries need attend, but which tokens they are is known only once
the hooks have seen the whole layer, after its last chunk. So the layer runs twice:

1. in chunks, up to attention only: ``attend`` gathers each chunk's queries, keys and values and
   stops the layer (``LayerGathered``), so nothing after attention (output projection, MLP) runs;
   after the last chunk the hooks are asked and the layer's cache stored, as in any chunked layer.
   The layer's input is left as it was. (Forward hooks on the model's modules after attention
   therefore see the second pass only.)
2. on the propagated tokens alone (their input, positions and rotary embeddings), in chunks too
   when they are more than one: ``attend`` stores nothing and asks no hook, and returns their
   attention over all the layer's keys, computed once after the first pass from the gathered
   queries (``selected_causal_attention``: the same queries the second pass computes).

After a restart (GemFilter) the layer's output is not used: there is no second pass. Where
``propagate`` did not answer (a wrong hint), the second pass is the layer over every token in
chunks, attending over the gathered keys: the hooks are asked once; the layer's norm and
query/key/value projections ran twice.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from kvpress_like.adapter import ModelAdapter
from kvpress_like.forward import Forward, LayerGathered
from kvpress_like.prefill_attention import chunk_attention, selected_causal_attention


def run_in_chunks(
    adapter: ModelAdapter, idx: int, hidden: Tensor, rotary: tuple, fwd: Forward, compiled: bool
) -> Tensor:
    """One decoder layer ``fwd.chunk`` tokens at a time. Each chunk's output replaces its input in
    place: later chunks need only the keys gathered."""
    for part in _chunks(hidden.shape[1], fwd.chunk):
        hidden[:, part] = _run_part(adapter, idx, hidden, rotary, fwd, compiled, part)
    fwd.in_flight = None
    return hidden


def run_propagation_layer(
    adapter: ModelAdapter,
    idx: int,
    layer_type: str,
    hidden: Tensor,
    rotary: tuple,
    fwd: Forward,
    compiled: bool,
) -> Tensor:
    """The propagation layer in two passes (see the module's docstring). Returns the layer's
    output for the propagated tokens, ``fwd`` having moved on to them (``take_propagated``); after
    a restart, the unused input with ``fwd.propagated`` still set; without a propagate answer, the
    output for every token."""
    fwd.gather_only = True
    for part in _chunks(hidden.shape[1], fwd.chunk):
        try:
            _run_part(adapter, idx, hidden, rotary, fwd, compiled, part)
        except LayerGathered:
            continue
        raise RuntimeError(f"layer {idx}: attention was not reached in the first pass")
    fwd.gather_only, fwd.in_flight = False, None
    queries, keys, values, scaling = fwd.held
    fwd.held = None
    if fwd.propagated is None:  # a wrong hint: every token's attention over the gathered keys
        del queries
        every = partial(_causal, keys, values, scaling)
        return _second_pass(adapter, idx, hidden, rotary, fwd, compiled, every)
    if fwd.restart:
        return hidden
    attention = selected_causal_attention(queries, keys, values, scaling, fwd.propagated, packed=True)
    del queries, keys, values  # freed: the cache holds what the strategy kept
    order = fwd.take_propagated()  # the order `attention` is packed in
    tokens = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    rotary = adapter.rotary(tokens, fwd.positions, layer_type)
    return _second_pass(adapter, idx, tokens, rotary, fwd, compiled, partial(_rows, attention))


def _second_pass(adapter, idx, hidden, rotary, fwd: Forward, compiled, attention) -> Tensor:
    fwd.second_pass = attention
    out = run_in_chunks(adapter, idx, hidden, rotary, fwd, compiled)
    fwd.second_pass = None
    return out


def _causal(keys: Tensor, values: Tensor, scaling: float, query: Tensor, part: slice) -> Tensor:
    """The chunk's queries at ``part`` over the keys up to them, as in a chunked layer."""
    return chunk_attention(query, keys, values, part.start, scaling)


def _rows(attention: Tensor, query: Tensor, part: slice) -> Tensor:
    """The chunk's rows of the attention computed after the first pass."""
    return attention[:, :, part]


def _run_part(adapter: ModelAdapter, idx, hidden, rotary, fwd: Forward, compiled, part: slice) -> Tensor:
    """The layer on the tokens at ``part`` (the chunk in flight)."""
    fwd.in_flight = part
    rotary_part = tuple(t[:, part] for t in rotary)
    return adapter.run_layer(idx, hidden[:, part], rotary_part, fwd.positions[:, part], fwd, compiled)


def _chunks(seq: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, seq, chunk)]
