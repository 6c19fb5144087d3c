"""SnapKV: observation-window selection per KV head, checked against a plain reference.

The reference (``strategy_reference.ref_window_scores`` computed in float64, and ``ref_select``) is
written from the paper's definition (the last ``window`` prompt queries vote for keys: softmax,
summed over the window, pooled over keys with stride 1 and zero padding, summed over the query
heads sharing a KV head; each KV head keeps its window plus the best-voted keys up to the budget,
ties to the earlier index) with plain loops, and uses nothing from ``kvpress_like.selection``.
Masks are compared exactly, scores with a float tolerance.

Exactness: inputs come from small pools of vectors with entries in {-1, 0, 1} * scale, so dot
products are exact and exact ties are common; a draw whose library and reference scores rank a
pair of valid entries differently (a float near-tie: the scores are asserted close first) is
skipped with ``assume``.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like.strategies.snapkv import SnapKV

from conftest import tiny_model
from strategy_reference import (
    ROWS,
    assert_smollm2_keeps_default_budget,
    assert_window_kept,
    bad_settings,
    budget_of,
    budget_settings,
    config_error,
    each_family,
    each_row_set,
    grid_shape,
    grid_view,
    keep_everything_and_full,
    kept_positions_end_to_end,
    make_strategy,
    make_view,
    one_hot,
    padded_lengths,
    ref_select,
    ref_window_scores,
    same_ranking,
)

NAME = "snapkv"
make_snapkv = partial(make_strategy, SnapKV)

# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(32))
    cfg = {"pooling": draw(st.sampled_from(["max", "avg"])), "kernel": draw(st.sampled_from([1, 3, 5, 7]))}
    cfg.update(draw(budget_settings(lengths, max_tokens=36)))
    return lengths, cfg, draw(grid_shape(seq, lengths))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """Scores match the reference closely, retain masks exactly; one choice per KV head."""
    lengths, cfg, s = case
    _, view = grid_view(lengths, s)
    strategy = make_snapkv(s["hkv"] * s["groups"], s["hkv"], **cfg)
    strategy.check_prompt(lengths)

    scores = strategy.score(layer=view)
    expected = ref_window_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"], dtype=torch.float64)
    assert scores.shape == (s["batch"], s["hkv"], s["seq"])
    valid = view.valid[:, None].expand_as(scores)
    torch.testing.assert_close(scores[valid], expected[valid], rtol=1e-5, atol=1e-6)
    assume(same_ranking(scores, expected, valid))

    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_select(expected, view, cfg["window"], budget_of(cfg)))
    assert keep.sum(-1).tolist() == [[budget_of(cfg)(n)] * s["hkv"] for n in lengths]


# ---------------------------------------------------------------- hand-made examples


def test_each_kv_head_keeps_what_its_own_query_group_looks_at():
    """Hq=4, Hkv=2: heads 0,1 read KV head 0, heads 2,3 KV head 1. Both KV heads hold e0 at key 1
    and e1 at key 3; head 1 looks for e0 and head 2 for e1, so KV head 0 keeps key 1 and KV head 1
    keeps key 3 (pairing by h % Hkv would swap them); the last token is the window."""
    keys = one_hot(6, 4, {1: 0, 3: 1})[None, None].repeat(1, 2, 1, 1)
    queries = torch.zeros(1, 4, 6, 4)
    queries[0, 1, 5, 0] = queries[0, 2, 5, 1] = 8.0
    view = make_view(queries, keys, [6])
    strategy = make_snapkv(4, 2, window=1, kernel=1, budget_mode="constant", retain_tokens=2)
    keep = strategy.retain(layer=view, scores=strategy.score(layer=view))
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 5]
    assert keep[0, 1].nonzero().flatten().tolist() == [3, 5]


def test_avg_pooling_keeps_the_neighbourhood_of_a_peak():
    """Default avg pooling (kernel 5): one sharp peak at key 10 spreads to keys 8..12; among
    equal pooled votes the earlier key wins. Budget 4 = window 1 + keys 8, 9, 10."""
    keys = one_hot(20, 4, {10: 0})[None, None]
    queries = one_hot(20, 4, {19: 0}, scale=32.0)[None, None]
    view = make_view(queries, keys, [20])
    strategy = make_snapkv(1, 1, window=1, budget_mode="constant", retain_tokens=4)
    assert strategy.config.pooling == "avg" and strategy.config.kernel == 5
    keep = strategy.retain(layer=view, scores=strategy.score(layer=view))[0, 0]
    assert keep.nonzero().flatten().tolist() == [8, 9, 10, 19]


# ---------------------------------------------------------------- end to end (tiny models)

BUDGETS = {
    "proportional": (dict(retain_rate=0.3, window=4), lambda n: math.floor(0.3 * n + 0.5)),
    "constant": (dict(budget_mode="constant", retain_tokens=11, window=5), lambda n: 11),
}


@each_family
@each_row_set
@pytest.mark.parametrize("mode", sorted(BUDGETS))
def test_budget_is_respected_end_to_end(family, rows, mode):
    cfg, budget = BUDGETS[mode]
    prompts = ROWS[rows]
    kept = kept_positions_end_to_end(family, NAME, cfg, budget, prompts)
    assert_window_kept(kept, prompts, cfg["window"])
    choices = {tuple(positions) for layer in kept for heads in layer for positions in heads}
    assert len(choices) > len(prompts), "heads and layers should choose differently"


@each_family
@each_row_set
def test_keep_everything_matches_full(family, rows):
    kept, full = keep_everything_and_full(tiny_model(family), NAME, ROWS[rows], max_new_tokens=6)
    assert kept.stats.kv_kept_per_layer == full.stats.kv_kept_per_layer


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_short_passkey_run(smollm2):
    assert_smollm2_keeps_default_budget(smollm2, NAME)


# ---------------------------------------------------------------- bad settings


@bad_settings(
    [
        ({"kernel": 4}, ["kernel: must be odd", "(got 4)"]),
        ({"kernel": 0}, ["snapkv.kernel", "greater than or equal to 1", "(got 0)"]),
        ({"pooling": "median"}, ["snapkv.pooling", "'max' or 'avg'", "median"]),
        ({"retain_rate": 1.5}, ["snapkv.retain_rate", "less than or equal to 1", "(got 1.5)"]),
        ({"window": 0}, ["snapkv.window", "greater than or equal to 1", "(got 0)"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"tsp_rate": 0.2}, ["snapkv.tsp_rate", "Extra inputs are not permitted"]),
    ]
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    config_error(NAME, settings, expected)


def test_window_larger_than_budget_fails_before_prefill():
    expected = ["snapkv.window", "keeps 4 tokens", "window=8"]
    config_error(NAME, dict(retain_rate=0.1, window=8), expected, prompt=ROWS["batch1"])  # 4 of 40 < 8
