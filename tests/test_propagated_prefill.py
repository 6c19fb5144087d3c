"""At the layer where tokens are propagated, attention is computed for the propagated queries only.

References are independent of the code under test: plain SDPA in float64 with repeated KV heads
for the kernel; transformers' own decoder layers for the pipeline (every token up to the TSP
layer, then the propagated tokens alone at their original positions); and the path that attends
every query at the TSP layer (a FastKV without the hint, whose TSP layer runs in chunks).
"""

from __future__ import annotations

import importlib

import pluggy
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import hookimpl, hookspecs, pipeline
from kvpress_like.cache import CompressedCache
from kvpress_like.contracts import HookRunner
from kvpress_like.forward import Forward
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


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 90),
    block=st.integers(1, 40),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_random_selections_equal_causal_attention(batch, seq, block, share, seed):
    query, keys, values = random_qkv(batch, seq, groups=2, seed=seed)
    selected = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < share
    selected[:, -1] = True  # as the pipeline: the last token always goes on
    out = selected_causal_attention(query, keys, values, 0.3, selected, block)
    assert_selected_rows_exact(out, query, keys, values, selected)


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
def attends(monkeypatch) -> list[tuple[int, int, torch.Tensor]]:
    """(layer, queries, output) of every ``Forward.attend`` call: the real method, wrapped."""
    calls: list[tuple[int, int, torch.Tensor]] = []
    original = Forward.attend

    def recorded(self, layer_idx, query, *args):
        out = original(self, layer_idx, query, *args)
        calls.append((layer_idx, query.shape[2], out))
        return out

    monkeypatch.setattr(Forward, "attend", recorded)
    return calls


def calls_per_layer(calls) -> list[int]:
    return [sum(1 for layer, _, _ in calls if layer == idx) for idx in range(4)]


class RecordPropagation:
    """Observes (does not change) what ``propagate`` answered, through a pluggy wrapper."""

    def __init__(self) -> None:
        self.chosen: torch.Tensor | None = None

    @hookimpl(wrapper=True)
    def propagate(self, layer, scores):
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


@pytest.mark.parametrize("prefill", ["eager", "compiled"])
def test_tsp_layer_runs_whole_and_attends_only_the_propagated_queries(prefill, attends, monkeypatch):
    """FastKV with layers in chunks of 16: the TSP layer (1) runs whole, its attention rows of
    dropped tokens are zeros; the logits equal transformers' layers on the propagated tokens, and
    tokens, kept entries and logits equal those of the path that attends every query there."""
    monkeypatch.setattr(prefill_attention, "SELECTED_BLOCK", 16)  # several blocks at 90 tokens
    model = tiny_model("llama")
    rows = random_rows([90, 90])
    recorder = RecordPropagation()
    gen = dict(max_new_tokens=6, stop_on_eos=False, prefill_chunk=16, prefill=prefill)
    pipe = pipeline(model, "fastkv", plugins=[recorder], **gen, **TINY_FASTKV)
    assert pipe.strategy.propagation_layer() == TINY_FASTKV["tsp_layer"] == 1
    context = pipe.compress(rows)
    # 90 tokens in 6 chunks at layer 0; the TSP layer whole; 45 tokens in 3 chunks after it.
    assert calls_per_layer(attends) == [6, 1, 3, 3]
    (out,) = [out for layer, _, out in attends if layer == 1]
    chosen = recorder.chosen
    assert chosen.sum(dim=-1).tolist() == [45, 45]
    assert not out[~chosen[:, None].expand(-1, out.shape[1], -1)].any()  # dropped: not computed
    assert out[chosen[:, None].expand(-1, out.shape[1], -1)].abs().min() > 0
    for row, ids in enumerate(rows):
        expected = transformers_logits(model, ids, chosen[row], tsp_layer=1)
        torch.testing.assert_close(context.last_logits[row : row + 1], expected, **LOGITS)

    attends.clear()
    everyone = pipeline(model, NoHint, **gen, **TINY_FASTKV)
    theirs = everyone.compress(rows)
    assert calls_per_layer(attends) == [6, 6, 3, 3]  # the TSP layer in chunks, every query attended
    for mine, ref in zip(kept_positions(context), kept_positions(theirs), strict=True):
        assert torch.equal(mine, ref)
    for mine, ref in zip(context.cache.layers, theirs.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys[mine.valid], ref.keys[ref.valid], **LOGITS)
    torch.testing.assert_close(context.last_logits, theirs.last_logits, **LOGITS)
    assert context.stats.tokens_per_layer == theirs.stats.tokens_per_layer == [[90, 90]] * 2 + [[45, 45]] * 2
    assert pipe(rows).token_ids == everyone(rows).token_ids


class HintAt(FastKV):
    """FastKV whose hint names another layer than its TSP layer (1)."""

    hint = 0

    def propagation_layer(self) -> int | None:
        return self.hint


@pytest.mark.parametrize("hint", [0, 3])
def test_a_mistaken_hint_costs_nothing_but_a_whole_layer(hint, attends):
    """The hinted layer runs whole (and attends every query); the TSP layer runs in chunks; the
    results equal the whole-layer prefill's."""
    model = tiny_model("llama")
    rows = random_rows([90, 90, 90], seed=4)
    gen = dict(max_new_tokens=5, stop_on_eos=False)
    mistaken = type("Mistaken", (HintAt,), {"hint": hint})
    chunked = pipeline(model, mistaken, prefill_chunk=16, **gen, **TINY_FASTKV)
    ours = chunked.compress(rows)
    expected = {0: [1, 6, 3, 3], 3: [6, 6, 3, 1]}[hint]
    assert calls_per_layer(attends) == expected
    whole = pipeline(model, "fastkv", prefill_chunk=None, **gen, **TINY_FASTKV)
    theirs = whole.compress(rows)
    for mine, ref in zip(kept_positions(ours), kept_positions(theirs), strict=True):
        assert torch.equal(mine, ref)
    torch.testing.assert_close(ours.last_logits, theirs.last_logits, **LOGITS)
    assert chunked(rows).token_ids == whole(rows).token_ids


def test_gemfilter_skips_the_filter_layers_attention_in_a_chunked_prefill(attends):
    """GemFilter, unpadded rows in chunks of 8: the filter layer (1) runs whole and attends nothing
    (its output is discarded for the second pass); the logits equal transformers' forward over the
    selected tokens at their original positions."""
    model = tiny_model("llama")
    rows = random_rows([40, 40], seed=6)
    recorder = RecordPropagation()
    pipe = pipeline(model, "gemfilter", filter_layer=1, retain_rate=0.25, prefill_chunk=8, plugins=[recorder])
    context = pipe.compress(rows)
    # First pass: layer 0 in 5 chunks, the filter layer whole; second pass: 10 tokens, 2 chunks.
    assert calls_per_layer(attends) == [5 + 2, 1 + 2, 2, 2]
    (out,) = [out for layer, seq, out in attends if layer == 1 and seq == 40]
    assert not out.any()
    for row, ids in enumerate(rows):
        positions = recorder.chosen[row].nonzero().flatten()
        with torch.no_grad():
            expected = model(torch.tensor(ids)[positions][None], position_ids=positions[None]).logits[:, -1]
        torch.testing.assert_close(context.last_logits[row : row + 1], expected, **LOGITS)
