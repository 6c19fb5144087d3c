"""At the layer where tokens are propagated, attention is computed for the propagated queries only.

References are independent of the code under test: plain SDPA in float64 with repeated KV heads
for the kernel; transformers' own decoder layers for the pipeline (every token up to the TSP
layer, then the propagated tokens alone at their original positions); and the path that attends
every query at the TSP layer (a FastKV without the hint, whose TSP layer runs in chunks). In
chunks the TSP layer runs in two passes (``chunked_prefill.py``): ``Forward.attend`` is wrapped,
not replaced, to count each pass's calls and queries.
"""

from __future__ import annotations

import importlib
from unittest.mock import patch

import pluggy
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import hookimpl, hookspecs, pipeline
from kvpress_like.cache import CompressedCache
from kvpress_like.contracts import HookRunner
from kvpress_like.forward import Forward, LayerGathered
from kvpress_like.prefill_attention import selected_causal_attention
from kvpress_like.strategies.fastkv import FastKV

from conftest import TINY_FASTKV, random_rows, tiny_model

prefill_attention = importlib.import_module("kvpress_like.prefill_attention")
FP32 = dict(rtol=1e-5, atol=1e-5)  # float32 kernels against a float64 reference
LOGITS = dict(rtol=1e-4, atol=1e-4)  # fp32 models, different groupings of the same sums


def reference_causal(query, keys, values, scaling) -> torch.Tensor:
    """Causal attention in float64, KV heads repeated for the query heads: ``[B, Hq, T, D]``."""
    groups = query.shape[1] // keys.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (keys, values))
    return F.scaled_dot_product_attention(query.double(), k, v, is_causal=True, scale=scaling)


def random_qkv(batch: int, seq: int, groups: int = 2, seed: int = 0, kv_heads: int = 2, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, seq, dim, generator=gen)
    keys, values = (torch.randn(batch, kv_heads, seq, dim, generator=gen) for _ in range(2))
    return query, keys, values


def assert_selected_rows_exact(out, query, keys, values, selected, scaling=0.3) -> None:
    """Selected rows equal the float64 causal reference; the others are zeros."""
    expected = reference_causal(query, keys, values, scaling)
    rows = selected[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[rows].double(), expected[rows], **FP32)
    assert not out[~rows].any()


def assert_packed_rows_exact(packed, query, keys, values, selected, scaling=0.3) -> None:
    """``packed=True``: each row's selected rows of the float64 causal reference, in query order,
    right-aligned to the most any row selects; zeros before them."""
    expected = reference_causal(query, keys, values, scaling)
    counts = selected.sum(dim=-1).tolist()
    assert packed.shape == (*query.shape[:2], max(counts), query.shape[3])
    for row, n in enumerate(counts):
        picked, before = selected[row].nonzero().flatten(), packed.shape[2] - n
        torch.testing.assert_close(packed[row, :, before:].double(), expected[row, :, picked], **FP32)
        assert not packed[row, :, :before].any()


def _mask(seq: int, picks: list[int]) -> list[bool]:
    return [i in picks for i in range(seq)]


# (seq, block, rows' selected indices): T not a multiple of the block, blocks smaller than T, the
# first and last tokens, a row with one token (in a later block), a row with none, every token.
CASES = [
    (37, 8, [[0, 36]]),
    (50, 16, [[0, 3, 17, 18, 31, 32, 49], [40], list(range(50))]),
    (20, 1, [[0, 5, 6, 19], [19]]),
    (33, 64, [[1, 2, 32], []]),
    (41, 7, [[6, 7, 13, 14, 40], [0], [20, 27, 28]]),
]


@pytest.mark.parametrize(("seq", "block", "picks"), CASES)
@pytest.mark.parametrize("groups", [1, 2])
def test_selected_rows_equal_causal_attention(seq, block, picks, groups):
    query, keys, values = random_qkv(len(picks), seq, groups)
    selected = torch.tensor([_mask(seq, p) for p in picks])
    out = selected_causal_attention(query, keys, values, 0.3, selected, block)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert_selected_rows_exact(out, query, keys, values, selected)
    packed = selected_causal_attention(query, keys, values, 0.3, selected, block, packed=True)
    assert packed.dtype == query.dtype
    assert_packed_rows_exact(packed, query, keys, values, selected)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 90),
    block=st.integers(1, 40),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    bucket=st.sampled_from([1, 3, 8, prefill_attention.SELECTED_BUCKET]),
)
def test_random_selections_equal_causal_attention(batch, seq, block, share, seed, bucket):
    """Exact for any query bucket: small ones pad counts within blocks longer than the bucket; the
    default's exceeds every block here, so it caps the counts at the block's queries."""
    query, keys, values = random_qkv(batch, seq, groups=2, seed=seed)
    selected = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < share
    selected[:, -1] = True  # as the pipeline: the last token always goes on
    with patch.object(prefill_attention, "SELECTED_BUCKET", bucket):
        out = selected_causal_attention(query, keys, values, 0.3, selected, block)
        packed = selected_causal_attention(query, keys, values, 0.3, selected, block, packed=True)
    assert_selected_rows_exact(out, query, keys, values, selected)
    assert_packed_rows_exact(packed, query, keys, values, selected)


@pytest.mark.parametrize(("bucket", "recur"), [(16, True), (1, False)])
def test_two_prompts_give_the_earlier_keys_the_same_query_counts(monkeypatch, bucket, recur):
    """cuDNN plans each new shape once: two prompts selecting 20 and 25 queries per block send the
    kernel the same rounded count (32) and every one of their rows stays exact; unrounded, each
    prompt's own counts, which the test's second case shows it would notice."""
    monkeypatch.setattr(prefill_attention, "SELECTED_BUCKET", bucket)
    calls = []
    original = prefill_attention.attention_with_lse

    def recording(query, keys, values, scaling, causal):
        if not causal:
            calls.append((query.shape[2], keys.shape[2]))
        return original(query, keys, values, scaling, causal)

    monkeypatch.setattr(prefill_attention, "attention_with_lse", recording)
    seq, block, shapes = 256, 64, []
    for per_block in (20, 25):
        query, keys, values = random_qkv(1, seq, seed=per_block)
        selected = torch.zeros(1, seq, dtype=torch.bool)
        for start in range(0, seq, block):
            selected[
                0, start + torch.randperm(block, generator=torch.Generator().manual_seed(start))[:per_block]
            ] = True
        calls.clear()
        out = selected_causal_attention(query, keys, values, 0.3, selected, block)
        assert_selected_rows_exact(out, query, keys, values, selected)
        shapes.append(list(calls))
    assert shapes[0] == [(32 if recur else 20, start) for start in (64, 128, 192)]
    assert (shapes[0] == shapes[1]) is recur


class Propagate:
    """Answers ``propagate`` at one layer with a fixed mask (and, optionally, asks to restart)."""

    def __init__(self, mask: torch.Tensor, restart: bool = False) -> None:
        self.mask, self.asked_restart = mask, restart

    @hookimpl
    def propagate(self, layer, scores):
        return self.mask

    @hookimpl
    def restart(self, layer):
        return self.asked_restart


def _forward(plugin: object, lengths: list[int], seq: int) -> Forward:
    """A fresh prefill pass over one layer of left-padded rows (valid tokens last), asking ``plugin``."""
    valid = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, seq - n :] = True
    positions = (valid.cumsum(dim=-1) - 1).clamp(min=0)
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs.StrategySpec)
    manager.register(plugin)
    cache = CompressedCache([None], valid.sum(dim=-1))
    return Forward(cache, positions, valid, HookRunner(manager, min_kept=1))


@pytest.mark.parametrize("lengths", [[30, 30], [30, 17, 9]], ids=["unpadded", "left-padded"])
def test_forward_attends_only_the_propagated_valid_queries(lengths, monkeypatch):
    monkeypatch.setattr(prefill_attention, "SELECTED_BLOCK", 8)  # several blocks per row
    seq = max(lengths)
    query, keys, values = random_qkv(len(lengths), seq, seed=5)
    mask = torch.rand(len(lengths), seq, generator=torch.Generator().manual_seed(6)) < 0.4
    mask[1, 0] = True  # left-padded: padding of the second row, chosen here, must stay unattended
    mask[-1, seq - lengths[-1]] = True  # a row's first valid token
    fwd = _forward(Propagate(mask), lengths, seq)
    out = fwd.attend(0, query, keys, values, 0.3, None)
    selected = fwd.propagated & fwd.valid
    assert torch.equal(fwd.propagated[:, :-1], mask[:, :-1]) and fwd.propagated[:, -1].all()
    assert int(selected.sum()) < selected.numel() // 2  # most rows were not attended
    for row, n in enumerate(lengths):  # each row's valid tokens, on their own
        part = (slice(row, row + 1), slice(None), slice(seq - n, seq))
        rows = selected[row : row + 1, seq - n :]
        assert_selected_rows_exact(out[part], query[part], keys[part], values[part], rows)
        assert not out[row, :, : seq - n].any()
    stored = fwd.cache.layers[0]  # the whole layer, as it was given (no retain answer)
    assert torch.equal(stored.keys, keys) and torch.equal(stored.valid, fwd.valid[:, None].expand(-1, 2, -1))


def test_forward_skips_attention_when_the_strategy_restarts():
    query, keys, values = random_qkv(2, 12, seed=7)
    fwd = _forward(Propagate(torch.ones(2, 12, dtype=torch.bool), restart=True), [12, 12], 12)
    out = fwd.attend(0, query, keys, values, 0.3, None)
    assert fwd.restart and out.shape == query.shape and not out.any()
    assert torch.equal(fwd.cache.layers[0].values, values)


# ---------------------------------------------------------------- end to end (tiny llama)


@pytest.fixture
def attends(monkeypatch) -> list[tuple[int, int, torch.Tensor | None]]:
    """(layer, queries, output) of every ``Forward.attend`` call, the real method wrapped; the
    output is None where the call stopped the layer (a propagation layer's first pass)."""
    calls: list[tuple[int, int, torch.Tensor | None]] = []
    original = Forward.attend

    def recorded(self, layer_idx, query, *args):
        try:
            out = original(self, layer_idx, query, *args)
        except LayerGathered:
            calls.append((layer_idx, query.shape[2], None))
            raise
        calls.append((layer_idx, query.shape[2], out))
        return out

    monkeypatch.setattr(Forward, "attend", recorded)
    return calls


@pytest.fixture
def stores(monkeypatch) -> list[int]:
    """The layer of every ``Forward._store`` call (the real method, wrapped): a layer's cache kept."""
    layers: list[int] = []
    original = Forward._store

    def recorded(self, layer_idx, *args, **kwargs):
        layers.append(layer_idx)
        return original(self, layer_idx, *args, **kwargs)

    monkeypatch.setattr(Forward, "_store", recorded)
    return layers


def calls_per_layer(calls) -> list[int]:
    return [sum(1 for layer, _, _ in calls if layer == idx) for idx in range(4)]


def passes(calls, layer: int) -> tuple[list[int], list[int]]:
    """Queries per ``attend`` call at ``layer``: of the calls that stopped it, of those that attended."""
    stopped = [seq for idx, seq, out in calls if idx == layer and out is None]
    attended = [seq for idx, seq, out in calls if idx == layer and out is not None]
    return stopped, attended


class RecordPropagation:
    """Observes (does not change) where ``propagate`` was asked and what it answered, through a
    pluggy wrapper."""

    def __init__(self) -> None:
        self.chosen: torch.Tensor | None = None
        self.asked: list[int] = []

    @hookimpl(wrapper=True)
    def propagate(self, layer, scores):
        self.asked.append(layer.layer_idx)
        chosen = yield
        if chosen is not None:
            self.chosen = chosen
        return chosen


class NoHint(FastKV):
    """FastKV without the hint: its TSP layer runs in chunks and attends every query."""

    def propagation_layer(self) -> int | None:
        return None


def transformers_logits(model, ids: list[int], chosen: torch.Tensor, tsp_layer: int) -> torch.Tensor:
    """Last-position logits from transformers' own decoder layers: every token through the TSP
    layer (full causal attention), then only the ``chosen`` ones at their original positions."""
    base = model.model
    with torch.no_grad():
        hidden = base.embed_tokens(torch.tensor([ids]))
        positions = torch.arange(len(ids))[None]
        for idx, layer in enumerate(base.layers):
            if idx == tsp_layer + 1:
                hidden, positions = hidden[:, chosen], positions[:, chosen]
            rotary = base.rotary_emb(hidden, positions)
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return model.lm_head(base.norm(hidden[:, -1])).float()


def kept_positions(context) -> list[torch.Tensor]:
    return [layer.positions[layer.valid] for layer in context.cache.layers]


# (prefill, chunk, attend calls per layer), 90 tokens per row, 45 propagated at the TSP layer (1).
# In chunks that layer runs in two passes: its 90 tokens a chunk at a time, each call stopping the
# layer at attention, then its 45 propagated tokens (chunks of 16: 3 calls; of 50: 1). Whole
# (no chunks): one call, the hooks asked before attention.
TSP_LAYER_CASES = [
    ("eager", 16, [6, 6 + 3, 3, 3]),
    ("compiled", 16, [6, 6 + 3, 3, 3]),
    ("eager", 50, [2, 2 + 1, 1, 1]),
    ("eager", None, [1, 1, 1, 1]),
]


@pytest.mark.parametrize(("prefill", "chunk", "calls"), TSP_LAYER_CASES)
def test_only_the_propagated_queries_attend_at_the_tsp_layer(
    prefill, chunk, calls, attends, stores, monkeypatch
):
    """FastKV, two unpadded rows: at the TSP layer only the propagated tokens' queries attend; the
    logits equal transformers' layers on the propagated tokens; tokens, kept entries and logits
    equal those of the path that attends every query there; each layer is stored once and its
    hooks asked once."""
    monkeypatch.setattr(prefill_attention, "SELECTED_BLOCK", 16)  # several blocks at 90 tokens
    model = tiny_model("llama")
    rows = random_rows([90, 90])
    recorder = RecordPropagation()
    gen = dict(max_new_tokens=6, stop_on_eos=False, prefill_chunk=chunk, prefill=prefill)
    pipe = pipeline(model, "fastkv", plugins=[recorder], **gen, **TINY_FASTKV)
    assert pipe.strategy.propagation_layer() == TINY_FASTKV["tsp_layer"] == 1
    context = pipe.compress(rows)
    assert calls_per_layer(attends) == calls
    assert stores == recorder.asked == [0, 1, 2, 3]  # nothing stored (or asked) twice
    chosen = recorder.chosen
    assert chosen.sum(dim=-1).tolist() == [45, 45]
    stopped, attended = passes(attends, 1)
    if chunk is None:  # whole: the rows of dropped tokens are not computed
        assert (stopped, attended) == ([], [90])
        (out,) = [out for layer, _, out in attends if layer == 1]
        picked = chosen[:, None].expand(-1, out.shape[1], -1)
        assert not out[~picked].any() and out[picked].abs().min() > 0
    else:  # every token, a chunk at a time, up to attention; then the propagated tokens
        assert sum(stopped) == 90 and max(stopped) == chunk
        assert sum(attended) == 45 and max(attended) <= chunk
    for row, ids in enumerate(rows):
        expected = transformers_logits(model, ids, chosen[row], tsp_layer=1)
        torch.testing.assert_close(context.last_logits[row : row + 1], expected, **LOGITS)

    attends.clear()
    everyone = pipeline(model, NoHint, **gen, **TINY_FASTKV)
    theirs = everyone.compress(rows)
    if chunk is not None:  # the TSP layer in chunks, every query attended
        assert passes(attends, 1) == ([], [chunk] * (90 // chunk) + [90 % chunk])
    for mine, ref in zip(kept_positions(context), kept_positions(theirs), strict=True):
        assert torch.equal(mine, ref)
    for mine, ref in zip(context.cache.layers, theirs.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys[mine.valid], ref.keys[ref.valid], **LOGITS)
    torch.testing.assert_close(context.last_logits, theirs.last_logits, **LOGITS)
    assert context.stats.tokens_per_layer == theirs.stats.tokens_per_layer == [[90, 90]] * 2 + [[45, 45]] * 2
    assert pipe(rows).token_ids == everyone(rows).token_ids


def test_the_tsp_layer_in_chunks_stays_chunk_sized(attends):
    """Three unpadded rows of 90 tokens in chunks of 16: every query tensor ``attend`` receives at
    the TSP layer is chunk-sized, and that layer's MLP (observed through a hook on the model's
    own module) runs on the propagated tokens only, a chunk at a time: the first pass stops at
    attention. Without chunks the layer runs whole."""
    model = tiny_model("llama")
    mlp_tokens: list[int] = []
    model.model.layers[1].mlp.register_forward_pre_hook(lambda _, args: mlp_tokens.append(args[0].shape[1]))
    rows = random_rows([90, 90, 90], seed=5)
    pipeline(model, "fastkv", prefill_chunk=16, **TINY_FASTKV).compress(rows)
    assert passes(attends, 1) == ([16] * 5 + [10], [16, 16, 13])
    assert mlp_tokens == [16, 16, 13]

    attends.clear(), mlp_tokens.clear()
    pipeline(model, "fastkv", prefill_chunk=None, **TINY_FASTKV).compress(rows)
    assert passes(attends, 1) == ([], [90]) and mlp_tokens == [90]


class PropagateAt:
    """Answers ``propagate`` at one layer only, with a fixed mask."""

    def __init__(self, layer: int, mask: torch.Tensor) -> None:
        self.layer, self.mask = layer, mask

    @hookimpl
    def propagate(self, layer, scores):
        return self.mask if layer.layer_idx == self.layer else None


@pytest.mark.parametrize("chunk", [16, None])
def test_rows_propagating_different_numbers_of_tokens(chunk):
    """A plugin propagating 20, 45 and 7 tokens of three unpadded rows at FastKV's TSP layer (the
    shorter rows then carry invalid slots first): each row's logits equal transformers' layers on
    its own propagated tokens, in two passes as whole."""
    model = tiny_model("llama")
    rows = random_rows([90, 90, 90], seed=8)
    gen = torch.Generator().manual_seed(9)
    mask = torch.zeros(3, 90, dtype=torch.bool)
    for row, n in enumerate([20, 45, 7]):
        mask[row, torch.randperm(89, generator=gen)[: n - 1]] = True
    mask[:, -1] = True  # as the pipeline: the last token always goes on
    pipe = pipeline(model, "fastkv", prefill_chunk=chunk, plugins=[PropagateAt(1, mask)], **TINY_FASTKV)
    context = pipe.compress(rows)
    assert context.stats.tokens_per_layer[2] == [20, 45, 7]
    for row, ids in enumerate(rows):
        expected = transformers_logits(model, ids, mask[row], tsp_layer=1)
        torch.testing.assert_close(context.last_logits[row : row + 1], expected, **LOGITS)


class HintAt(FastKV):
    """FastKV whose hint names another layer than its TSP layer (1)."""

    hint = 0

    def propagation_layer(self) -> int | None:
        return self.hint


# (hint, chunk, attend calls per layer). A hinted layer that does not propagate, in chunks: its
# first pass (chunks stopped at attention), then the layer again over every token in chunks; the
# TSP layer in chunks, every query attending. Whole layers: one call each.
MISTAKEN_HINTS = [(0, 16, [6 + 6, 6, 3, 3]), (3, 16, [6, 6, 3, 3 + 3]), (0, None, [1, 1, 1, 1])]


@pytest.mark.parametrize(("hint", "chunk", "calls"), MISTAKEN_HINTS)
def test_a_mistaken_hint_costs_time_never_correctness(hint, chunk, calls, attends, stores):
    """Three unpadded rows: the results equal the whole-layer prefill's; the hinted layer is stored
    once and its hooks asked once."""
    model = tiny_model("llama")
    rows = random_rows([90, 90, 90], seed=4)
    gen = dict(max_new_tokens=5, stop_on_eos=False)
    mistaken = type("Mistaken", (HintAt,), {"hint": hint})
    recorder = RecordPropagation()
    hinted = pipeline(model, mistaken, prefill_chunk=chunk, plugins=[recorder], **gen, **TINY_FASTKV)
    ours = hinted.compress(rows)
    assert calls_per_layer(attends) == calls
    assert stores == recorder.asked == [0, 1, 2, 3]
    if chunk is not None:
        stopped, attended = passes(attends, hint)
        assert sum(stopped) == sum(attended) == (90 if hint == 0 else 45)
    whole = pipeline(model, "fastkv", prefill_chunk=None, **gen, **TINY_FASTKV)
    theirs = whole.compress(rows)
    for mine, ref in zip(kept_positions(ours), kept_positions(theirs), strict=True):
        assert torch.equal(mine, ref)
    torch.testing.assert_close(ours.last_logits, theirs.last_logits, **LOGITS)
    assert hinted(rows).token_ids == whole(rows).token_ids


def test_gemfilter_skips_the_filter_layers_attention_in_a_chunked_prefill(attends):
    """GemFilter, unpadded rows in chunks of 8: the filter layer (1) runs its first pass only (every
    chunk stopped at attention, nothing attends; the pipeline restarts, so no second pass); the
    logits equal transformers' forward over the selected tokens at their original positions."""
    model = tiny_model("llama")
    rows = random_rows([40, 40], seed=6)
    recorder = RecordPropagation()
    pipe = pipeline(model, "gemfilter", filter_layer=1, retain_rate=0.25, prefill_chunk=8, plugins=[recorder])
    context = pipe.compress(rows)
    # First pass: layer 0 in 5 chunks, the filter layer's 5 stopped; second pass: 10 tokens, 2 chunks.
    assert calls_per_layer(attends) == [5 + 2, 5 + 2, 2, 2]
    assert passes(attends, 1) == ([8] * 5, [8, 2])
    for row, ids in enumerate(rows):
        positions = recorder.chosen[row].nonzero().flatten()
        with torch.no_grad():
            expected = model(torch.tensor(ids)[positions][None], position_ids=positions[None]).logits[:, -1]
        torch.testing.assert_close(context.last_logits[row : row + 1], expected, **LOGITS)
