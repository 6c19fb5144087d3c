"""GemFilter: selection against an independent reference, two-pass prefill, original positions.

The selection reference (``ref_scores`` below, then ``strategy_reference.ref_select``) is written
from the paper's definition (the last query's fp32 softmax attention at the filter layer, summed
over every query head; the ``window`` most recent tokens plus the best scores up to the budget,
ties to the earlier index, padding never chosen) and uses nothing from ``kvpress_like.selection``.
The end-to-end references are plain transformers forwards on the selected tokens with explicit
``position_ids``.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import hookimpl, list_strategies, pipeline
from kvpress_like.hookspecs import LayerView
from kvpress_like.strategies.gemfilter import GemFilter, last_query_scores

from conftest import tiny_model
from strategy_reference import (
    bad_settings,
    budget_of,
    budget_settings,
    config_error,
    each_family,
    grid_shape,
    grid_view,
    make_strategy,
    make_view,
    one_hot,
    padded_lengths,
    ref_select,
    same_ranking,
    smollm2_passkey_run,
)

LOGIT_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
make_gemfilter = partial(make_strategy, GemFilter)

# ---------------------------------------------------------------- reference (paper definition)


def ref_scores(view: LayerView, softmax: bool = True) -> torch.Tensor:
    """[B, S]: softmax of the last query over the row's valid keys, summed over all query heads
    (``softmax=False``: the scaled logits themselves, as the authors' code ranks them)."""
    q, k = view.queries.float(), view.keys.float()
    batch, hq, seq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, seq)
    for b in range(batch):
        valid = view.valid[b]
        for h in range(hq):
            logits = (k[b, h // group] @ q[b, h, -1]) * view.scaling
            out[b, valid] += torch.softmax(logits[valid], dim=0) if softmax else logits[valid]
    return out


# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(40))
    cfg = draw(budget_settings(lengths))
    cfg["scores"] = draw(st.sampled_from(["softmax", "logits"]))
    num_layers = draw(st.integers(1, 4))
    cfg["filter_layer"] = draw(st.integers(0, num_layers - 1))
    shape = draw(grid_shape(seq, lengths))
    layer_idx = draw(st.sampled_from([cfg["filter_layer"], *range(num_layers)]))
    shape.update(layer_idx=layer_idx, num_layers=num_layers)
    return lengths, cfg, shape


@settings(max_examples=200, deadline=None)
@given(cases())
def test_selection_matches_reference(case):
    """Scores match the reference closely; the propagated mask matches it exactly, and only the
    filter layer answers (propagate and restart)."""
    lengths, cfg, s = case
    _, view = grid_view(lengths, s)
    strategy = make_gemfilter(s["hkv"] * s["groups"], s["hkv"], s["num_layers"], **cfg)

    keep = strategy.propagate(layer=view, scores=None)
    if s["layer_idx"] != cfg["filter_layer"]:
        assert keep is None and strategy.restart(layer=view) is None
        return
    assert strategy.restart(layer=view) is True
    softmax = cfg["scores"] == "softmax"
    expected_scores = ref_scores(view, softmax)
    scores = last_query_scores(view, softmax)
    # raw logits are sums of large terms of both signs: an absolute tolerance relative to them
    atol = 1e-6 if softmax else 1e-6 * float(expected_scores.abs().max().clamp(min=1))
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=atol)
    assume(same_ranking(scores, expected_scores, view.valid))

    budget = budget_of(cfg)
    expected = ref_select(expected_scores, view, cfg["window"], budget)
    assert keep.shape == (s["batch"], s["seq"]) and keep.dtype == torch.bool
    assert torch.equal(keep, expected)
    assert not (keep & ~view.valid).any()
    assert keep.sum(-1).tolist() == [budget(n) for n in lengths]


# ---------------------------------------------------------------- hand-made examples


def test_only_the_last_query_chooses():
    """Query 4 looks at key 0, the last query (5) at key 2. Window 2, budget 3: keys 4, 5 and 2.
    An observation window of queries (FastKV-style) would tie 0 and 2 and keep 0."""
    keys = one_hot(6, 4, {0: 0, 2: 1})[None, None]
    queries = one_hot(6, 4, {4: 0, 5: 1})[None, None]
    gem = make_gemfilter(1, 1, filter_layer=0, window=2, budget_mode="constant", retain_tokens=3)
    keep = gem.propagate(layer=make_view(queries, keys, [6]), scores=None)
    assert keep[0].nonzero().flatten().tolist() == [2, 4, 5]


def test_softmax_per_head_then_summed_over_all_query_heads():
    """Head 0 puts logit 100 on key 1; heads 1 and 2 put logit 10 on key 3. Per-head softmax
    summed over heads favours key 3 (about 2 against 1); summed raw logits would favour key 1."""
    keys = torch.zeros(1, 1, 6, 3)
    keys[0, 0, 1, 0] = keys[0, 0, 3, 1] = 1.0
    queries = torch.zeros(1, 3, 6, 3)
    queries[0, 0, 5, 0], queries[0, 1, 5, 1], queries[0, 2, 5, 1] = 100.0, 10.0, 10.0
    view = make_view(queries * 3**0.5, keys, [6])  # undo the 1/sqrt(3) scaling
    gem = make_gemfilter(3, 1, filter_layer=0, budget_mode="constant", retain_tokens=2)
    assert gem.propagate(layer=view, scores=None)[0].nonzero().flatten().tolist() == [3, 5]


def test_gqa_query_head_h_reads_kv_head_h_div_groups():
    """Hq=4, Hkv=2. KV head 0 holds e0 at key 1 and e1 at key 3; KV head 1 holds e0 at key 3.
    Query heads look for e0, e1, e0, e0: with h // G key 3 wins 3 heads to 1; pairing by
    h % Hkv would give key 1 two heads and key 3 only one."""
    keys = torch.zeros(1, 2, 6, 4)
    keys[0, 0] = one_hot(6, 4, {1: 0, 3: 1})
    keys[0, 1] = one_hot(6, 4, {3: 0})
    queries = torch.zeros(1, 4, 6, 4)
    queries[0, [0, 2, 3], 5, 0] = queries[0, 1, 5, 1] = 8.0
    gem = make_gemfilter(4, 2, filter_layer=0, budget_mode="constant", retain_tokens=2)
    keep = gem.propagate(layer=make_view(queries, keys, [6]), scores=None)
    assert keep[0].nonzero().flatten().tolist() == [3, 5]


def test_padding_is_never_chosen_and_ties_go_to_the_earlier_token():
    """Row 1 is left-padded by 3 with padding keys that match the last query best; its identical
    keys at slots 4 and 6 tie exactly and the earlier one is kept."""
    keys = one_hot(8, 4, {0: 0, 1: 0, 2: 0, 4: 0, 6: 0})[None, None].repeat(2, 1, 1, 1)
    keys[1, 0, :3] *= 4
    queries = one_hot(8, 4, {7: 0})[None, None].repeat(2, 1, 1, 1)
    view = make_view(queries, keys, [8, 5])
    scores = last_query_scores(view)
    assert scores[1, :3].eq(0).all() and scores[1, 4] == scores[1, 6]
    gem = make_gemfilter(1, 1, filter_layer=0, budget_mode="constant", retain_tokens=2)
    keep = gem.propagate(layer=view, scores=None)
    assert keep[0].nonzero().flatten().tolist() == [0, 7]
    assert keep[1].nonzero().flatten().tolist() == [4, 7]


# ---------------------------------------------------------------- end to end on tiny models


def _prompts(lengths: list[int], seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


@each_family
@pytest.mark.parametrize("filter_layer", [None, 0, 3])
def test_two_passes_in_the_stats(family, filter_layer):
    """First pass up to the filter layer on every token, second pass on the selected ones; every
    layer's cache holds exactly the selected tokens."""
    model = tiny_model(family)
    pipe = pipeline(model, "gemfilter", retain_rate=0.25, filter_layer=filter_layer, max_new_tokens=3)
    out = pipe(_prompts([40, 24]))
    layer = {None: 2, 0: 0, 3: 3}[filter_layer]  # default: round(13 / 32 * 4)
    assert pipe.strategy.filter_layer == layer
    assert out.stats.tokens_per_layer == [[50, 30]] * (layer + 1) + [[10, 6]] * (3 - layer)
    assert out.stats.kv_kept_per_layer == [[10.0, 6.0]] * 4
    head_dim = model.model.layers[0].self_attn.head_dim
    assert out.stats.cache_bytes_kept == 16 * 4 * 2 * head_dim * 2 * 4  # tokens, layers, Hkv, K+V, fp32


@each_family
def test_keep_everything_reproduces_the_full_cache(family):
    model = tiny_model(family)
    rows = _prompts([40, 24])
    settings = dict(max_new_tokens=8, stop_on_eos=False)
    full = pipeline(model, "full", **settings)
    gem = pipeline(model, "gemfilter", retain_rate=1.0, **settings)
    out, expected = gem(rows), full(rows)
    assert len({t for row in expected.token_ids for t in row}) > 2, "degenerate reference"
    assert out.token_ids == expected.token_ids
    assert out.stats.tokens_per_layer == [[80, 48]] * 3 + [[40, 24]]
    torch.testing.assert_close(gem.compress(rows).last_logits, full.compress(rows).last_logits)


def _selected(context, row: int) -> torch.Tensor:
    """Original positions of the tokens a row kept; the same set in every layer and head."""
    layers = context.cache.layers
    picked = [lc.positions[row, h][lc.valid[row, h]] for lc in layers for h in range(lc.valid.shape[1])]
    assert all(torch.equal(p, picked[0]) for p in picked)
    return picked[0]


@each_family
def test_selection_is_the_filter_layers_last_query_attention(family):
    """The kept tokens are the top of transformers' own (eager) attention weights of the last
    query at the filter layer, summed over heads; the last token included."""
    rows = _prompts([40, 24])
    pipe = pipeline(tiny_model(family), "gemfilter", retain_rate=0.25)
    context = pipe.compress(rows)
    eager = tiny_model(family)
    eager.config._attn_implementation = "eager"
    for row, (ids, k) in enumerate(zip(rows, [10, 6], strict=True)):
        with torch.no_grad():
            attn = eager(torch.tensor([ids]), output_attentions=True).attentions[pipe.strategy.filter_layer]
        scores = attn[0, :, -1].sum(0)
        scores[-1] = float("inf")  # window 1: the last token is always chosen
        expected = scores.topk(k).indices.sort().values
        assert torch.equal(_selected(context, row), expected)


@each_family
def test_second_pass_keeps_original_positions(family):
    """Prefill logits and greedy decode match a transformers forward over the selected tokens at
    their ORIGINAL positions (decode continuing at prompt length + step); renumbering the selected
    tokens 0..k-1, or decoding at k + step, gives clearly different answers."""
    model = tiny_model(family)
    rows = _prompts([40, 24])
    pipe = pipeline(model, "gemfilter", retain_rate=0.25, max_new_tokens=6, stop_on_eos=False)
    context, out = pipe.compress(rows), pipe(rows)
    for row, ids in enumerate(rows):
        positions = _selected(context, row)
        k, n = len(positions), len(ids)
        assert positions.tolist() != list(range(k))
        selected = torch.tensor(ids)[positions][None]
        with torch.no_grad():
            original = model(selected, position_ids=positions[None]).logits[:, -1]
            renumbered = model(selected, position_ids=torch.arange(k)[None]).logits[:, -1]
        torch.testing.assert_close(context.last_logits[row : row + 1], original, **LOGIT_TOLERANCE)
        assert (renumbered - original).abs().max() > 0.1

        generated = out.token_ids[row]
        forced = torch.cat([selected[0], torch.tensor(generated[:-1])])[None]

        def greedy(decode_start: int, forced=forced, positions=positions, k=k) -> list[int]:
            steps = torch.arange(forced.shape[1] - k) + decode_start
            with torch.no_grad():
                logits = model(forced, position_ids=torch.cat([positions, steps])[None]).logits
            return logits[0, k - 1 :].argmax(-1).tolist()

        assert generated == greedy(n)
        assert generated != greedy(k)


class _RecordSelection:
    """Observes (does not change) what ``propagate`` answered, through a pluggy wrapper."""

    def __init__(self) -> None:
        self.positions: list[torch.Tensor] = []

    @hookimpl(wrapper=True)
    def propagate(self, layer, scores):
        chosen = yield
        if chosen is not None:
            self.positions = [layer.positions[b][chosen[b]] for b in range(chosen.shape[0])]
        return chosen


@pytest.mark.parametrize("lengths", [[40, 24], [40]], ids=["batch", "alone"])
def test_sliding_window_counts_original_positions(lengths):
    """Mistral (every layer sliding, window 24): in the second pass a selected token sees only the
    selected tokens less than 24 ORIGINAL positions before it, as in the full model; and each
    sliding layer then keeps only what its window can still reach."""
    model = tiny_model("mistral")
    rows = _prompts(lengths)
    recorder = _RecordSelection()
    context = pipeline(model, "gemfilter", retain_rate=0.25, plugins=[recorder]).compress(rows)
    positions = recorder.positions[0]
    distance = positions[:, None] - positions[None, :]
    window = (distance >= 0) & (distance < model.config.sliding_window)
    assert not window.equal(distance >= 0), "the selection fits in the window: the test would prove little"
    selected = torch.tensor(rows[0])[positions][None]
    with torch.no_grad():
        logits = model(selected, attention_mask=window[None, None], position_ids=positions[None]).logits
    torch.testing.assert_close(context.last_logits[:1], logits[:, -1], **LOGIT_TOLERANCE)
    reachable = positions[positions > len(rows[0]) - model.config.sliding_window]
    layer = context.cache.layers[0]
    assert layer.positions[0, 0][layer.valid[0, 0]].tolist() == reachable.tolist()


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_passkey_prompt_within_budget(smollm2):
    model = smollm2[0]
    pipe, _, out = smollm2_passkey_run(smollm2, "gemfilter", retain_rate=0.2)
    n = out.stats.prompt_tokens[0]
    k, layers, layer = math.floor(0.2 * n + 0.5), model.config.num_hidden_layers, pipe.strategy.filter_layer
    assert 250 <= n <= 350 and layer == round(13 / 32 * layers)
    assert out.stats.tokens_per_layer == [[n + k]] * (layer + 1) + [[k]] * (layers - layer - 1)
    assert out.stats.kv_kept_per_layer == [[float(k)]] * layers
    assert out.stats.cache_bytes_kept * n == out.stats.cache_bytes_full * k
    assert 1 <= len(out.ids) <= 5 and isinstance(out.text, str)


# ---------------------------------------------------------------- settings


@bad_settings(
    [
        ({"filter_layer": 4}, ["gemfilter.filter_layer", "below the model's 4 layers", "got 4"]),
        ({"filter_layer": -1}, ["gemfilter.filter_layer", "greater than or equal to 0", "-1"]),
        ({"retain_rate": 0.0}, ["gemfilter.retain_rate", "greater than 0", "0.0"]),
        ({"retain_rate": 1.5}, ["gemfilter.retain_rate", "less than or equal to 1", "1.5"]),
        ({"window": 0}, ["gemfilter.window", "greater than or equal to 1", "0"]),
        ({"budget_mode": "constant"}, ["retain_tokens is required"]),
        (
            {"budget_mode": "constant", "retain_tokens": 2, "window": 4},
            ["retain_tokens must be >= window (4)", "2"],
        ),
        ({"filter_layr": 1}, ["gemfilter.filter_layr", "Extra inputs are not permitted"]),
    ]
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    config_error("gemfilter", settings, expected)


def test_window_larger_than_the_budget_fails_before_prefill():
    expected = ["gemfilter.window", "keeps 2 tokens", "window=4"]
    config_error("gemfilter", dict(window=4, retain_rate=0.05), expected, prompt=_prompts([40]))


def test_described_with_the_paper():
    assert list_strategies()["gemfilter"].startswith("GemFilter (arXiv 2409.17422)")
