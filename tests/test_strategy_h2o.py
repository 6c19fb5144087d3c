"""H2O: heavy hitters by accumulated attention plus recent tokens, checked against a plain reference.

The reference (``strategy_reference.ref_window_scores`` over every query, unpooled, computed in
float64, and ``ref_select``) is written from the paper's definition (every prompt query attends
causally to the keys before it, softmax; a key's score is the attention it receives, summed over
all queries and over the query heads sharing its KV head; each KV head keeps the recent window
plus the heaviest hitters up to the budget, ties to the earlier index) with plain loops, and uses
nothing from ``kvpress_like.selection``. Masks are compared exactly, scores with a float tolerance.

Exactness: inputs come from small pools of vectors with entries in {-1, 0, 1} * scale, so dot
products are exact and exact ties are common; a draw whose library and reference scores rank a
pair of valid entries differently (a float near-tie: the scores are asserted close first) is
skipped with ``assume``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import pipeline
from kvpress_like.hookspecs import LayerView
from kvpress_like.strategies.h2o import H2O

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

NAME = "h2o"
make_h2o = partial(make_strategy, H2O)

# ---------------------------------------------------------------- reference (paper definition)


def ref_scores(view: LayerView) -> torch.Tensor:
    """Attention each key receives from every valid prompt query: [B, Hkv, S], one query at a time."""
    return ref_window_scores(view, window=None, pooling=None, dtype=torch.float64)


def ref_scores_unchunked(view: LayerView) -> torch.Tensor:
    """The same score from the whole [B, Hq, S, S] attention matrix at once (fp32)."""
    q, k = view.queries.float(), view.keys.float()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) * view.scaling  # [B, Hq, S, S]
    causal = view.positions[:, None, :] <= view.positions[:, :, None]  # [B, query, key]
    allowed = causal & view.valid[:, None, :] & view.valid[:, :, None]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    per_head = probs.sum(dim=-2)  # [B, Hq, S]
    return per_head.reshape(q.shape[0], k.shape[1] // groups, groups, -1).sum(dim=2)


def ref_keep_h2o(scores: torch.Tensor, view: LayerView, cfg: dict) -> torch.Tensor:
    """The paper's split: per row, ``recent_share`` of its budget (rounded half up, at least
    ``window``, at most the budget; None: ``window``) as its newest tokens, then the heaviest
    hitters up to the budget."""
    budget, share = budget_of(cfg), cfg.get("recent_share", 0.5)
    rows = []
    for b, n in enumerate(view.prompt_lengths.tolist()):
        k = budget(n)
        recent = cfg["window"] if share is None else min(k, max(cfg["window"], math.floor(share * k + 0.5)))
        rows.append(ref_select(scores[b : b + 1], replace(view, valid=view.valid[b : b + 1],
                                                           prompt_lengths=view.prompt_lengths[b : b + 1]),
                               recent, lambda _n, k=k: k))  # fmt: skip
    return torch.cat(rows)


# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(28))
    cfg = {
        "chunk_size": draw(st.integers(1, seq + 3)),
        "recent_share": draw(st.sampled_from([None, 0.25, 0.5, 1.0])),
    }
    cfg.update(draw(budget_settings(lengths, max_tokens=32)))
    return lengths, cfg, draw(grid_shape(seq, lengths))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """Scores (any chunk size) match the reference closely, retain masks exactly."""
    lengths, cfg, s = case
    _, view = grid_view(lengths, s)
    strategy = make_h2o(s["hkv"] * s["groups"], s["hkv"], **cfg)
    strategy.check_prompt(lengths)

    scores = strategy.score(layer=view)
    expected = ref_scores(view)
    assert scores.dtype == torch.float32 and scores.shape == (s["batch"], s["hkv"], s["seq"])
    valid = view.valid[:, None].expand_as(scores)
    torch.testing.assert_close(scores[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assume(same_ranking(scores, expected, valid))

    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_keep_h2o(expected, view, cfg))
    assert keep.sum(-1).tolist() == [[budget_of(cfg)(n)] * s["hkv"] for n in lengths]


@pytest.mark.parametrize("lengths", [[23], [23, 17, 5]], ids=["full-row", "left-padded"])
def test_chunked_score_equals_unchunked(lengths):
    """chunk_size 1, a few that do not divide S, S itself and more than S: all the same scores."""
    gen = torch.Generator().manual_seed(7)
    queries = torch.randn(len(lengths), 6, 23, 8, generator=gen) * 2
    keys = torch.randn(len(lengths), 2, 23, 8, generator=gen) * 2
    view = make_view(queries, keys, lengths)
    expected = ref_scores_unchunked(view)
    torch.testing.assert_close(expected, ref_scores(view), rtol=1e-5, atol=1e-5)  # the two references agree
    for chunk in (1, 2, 5, 7, 22, 23, 24, 512):
        scores = make_h2o(6, 2, chunk_size=chunk).score(layer=view)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5, msg=f"chunk_size={chunk}")


@pytest.mark.parametrize("chunk", [1, 4, 10, 64])
def test_no_full_attention_matrix_is_built(monkeypatch, chunk):
    """Every softmax the score takes covers at most chunk_size queries: [B, Hkv, G, <=chunk, S]."""
    shapes = []
    softmax = torch.softmax

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return softmax(x, *args, **kwargs)

    gen = torch.Generator().manual_seed(1)
    view = make_view(
        torch.randn(2, 4, 30, 8, generator=gen), torch.randn(2, 2, 30, 8, generator=gen), [30, 21]
    )
    strategy = make_h2o(4, 2, chunk_size=chunk)
    monkeypatch.setattr(torch, "softmax", spy)
    scores = strategy.score(layer=view)
    monkeypatch.undo()
    assert len(shapes) == math.ceil(30 / chunk)
    assert all(shape[-2] <= chunk and shape[-1] == 30 for shape in shapes)
    assert sum(shape[-2] for shape in shapes) == 30  # every query once
    torch.testing.assert_close(scores, ref_scores_unchunked(view), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hand-made examples


def test_a_key_many_queries_attend_to_beats_one_the_last_query_attends_to():
    """Queries 3..7 all look for e0 (key 2); only query 9 looks for e1 (key 6). H2O keeps key 2
    (five queries' worth of attention) where an observation window of 1 would keep key 6."""
    keys = one_hot(10, 4, {2: 0, 6: 1})[None, None]
    queries = one_hot(10, 4, {3: 0, 4: 0, 5: 0, 7: 0, 8: 0, 9: 1})[None, None]
    view = make_view(queries, keys, [10])
    strategy = make_h2o(1, 1, window=1, budget_mode="constant", retain_tokens=2)
    scores = strategy.score(layer=view)
    assert int(scores[0, 0, :9].argmax()) == 2
    assert strategy.retain(layer=view, scores=scores)[0, 0].nonzero().flatten().tolist() == [2, 9]


def test_half_of_the_budget_goes_to_recent_tokens_as_in_the_paper():
    """Budget 6 of 12 tokens, window 1. Every query looks for e0, which keys 0..5 hold: they are
    the heavy hitters. The paper's split keeps the 3 newest tokens and 3 heavy hitters;
    ``recent_share=None`` keeps the newest token and 5 heavy hitters."""
    keys = one_hot(12, 4, dict.fromkeys(range(6), 0))[None, None]
    queries = one_hot(12, 4, dict.fromkeys(range(12), 0))[None, None]
    view = make_view(queries, keys, [12])
    for share, expected in ((0.5, [0, 1, 2, 9, 10, 11]), (None, [0, 1, 2, 3, 4, 11])):
        strategy = make_h2o(1, 1, window=1, budget_mode="constant", retain_tokens=6, recent_share=share)
        keep = strategy.retain(layer=view, scores=strategy.score(layer=view))
        assert keep[0, 0].nonzero().flatten().tolist() == expected, share


def test_padding_neither_receives_nor_gives_attention():
    """Left padding of 4: padding keys score 0, and a row's scores do not depend on its padding."""
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(1, 2, 12, 4, generator=gen), torch.randn(1, 1, 12, 4, generator=gen)
    padded = make_h2o(2, 1).score(layer=make_view(queries, keys, [8]))
    alone = make_h2o(2, 1).score(layer=make_view(queries[:, :, 4:], keys[:, :, 4:], [8]))
    assert torch.equal(padded[..., :4], torch.zeros(1, 1, 4))
    torch.testing.assert_close(padded[..., 4:], alone)
    torch.testing.assert_close(alone.sum(), torch.tensor(2 * 8.0))  # each query's attention sums to 1


def test_sliding_window_layers_are_not_scored():
    """retain is never asked at a sliding layer, so the S x S accumulation is skipped there."""
    gen = torch.Generator().manual_seed(3)
    view = make_view(torch.randn(1, 2, 16, 4, generator=gen), torch.randn(1, 1, 16, 4, generator=gen), [16])
    strategy = make_h2o(2, 1, budget_mode="constant", retain_tokens=8)
    assert strategy.score(layer=replace(view, sliding_window=12)) is None
    assert strategy.retain(layer=replace(view, sliding_window=12), scores=None) is None
    assert strategy.score(layer=view) is not None


# ---------------------------------------------------------------- end to end (tiny models)

BUDGETS = {
    "proportional": (dict(retain_rate=0.3, window=4, chunk_size=7), lambda n: math.floor(0.3 * n + 0.5)),
    "constant": (dict(budget_mode="constant", retain_tokens=11, window=5), lambda n: 11),
}


@each_family
@each_row_set
@pytest.mark.parametrize("mode", sorted(BUDGETS))
def test_budget_is_respected_end_to_end(family, rows, mode):
    cfg, budget = BUDGETS[mode]
    kept = kept_positions_end_to_end(family, NAME, cfg, budget, ROWS[rows])
    assert_window_kept(kept, ROWS[rows], cfg["window"])


def test_mixed_sliding_and_full_layers():
    """Gemma3 (sliding, full, sliding, full): full layers keep the budget, sliding ones their window."""
    model = tiny_model("gemma3")
    prompts = ROWS["batch2-left-padded"]
    out = pipeline(model, NAME, retain_rate=0.3, window=4, max_new_tokens=2)(prompts)
    window = model.config.sliding_window
    kept = out.stats.kv_kept_per_layer
    assert kept[1] == kept[3] == [12.0, 8.0]
    assert kept[0] == kept[2] == [float(window - 1)] * 2  # positions > n - window: window - 1 of them


@each_family
@each_row_set
def test_keep_everything_matches_full(family, rows):
    kept, full = keep_everything_and_full(
        tiny_model(family), NAME, ROWS[rows], max_new_tokens=6, chunk_size=5
    )
    assert kept.stats.kv_kept_per_layer == full.stats.kv_kept_per_layer


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_short_passkey_run(smollm2):
    assert_smollm2_keeps_default_budget(smollm2, NAME, chunk_size=128)


# ---------------------------------------------------------------- bad settings


@bad_settings(
    [
        ({"chunk_size": 0}, ["h2o.chunk_size", "greater than or equal to 1", "(got 0)"]),
        ({"chunk_size": 2.5}, ["h2o.chunk_size", "(got 2.5)"]),
        ({"retain_rate": 0.0}, ["h2o.retain_rate", "greater than 0", "(got 0.0)"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"pooling": "max"}, ["h2o.pooling", "Extra inputs are not permitted"]),
    ]
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    config_error(NAME, settings, expected)


def test_window_larger_than_budget_fails_before_prefill():
    expected = ["h2o.window", "keeps 4 tokens"]
    config_error(NAME, dict(retain_rate=0.1, window=8), expected, prompt=ROWS["batch1"])  # 4 of 40 < 8
