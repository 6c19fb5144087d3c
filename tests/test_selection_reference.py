"""FastKV's token selection checked against an independent plain-PyTorch reference.

The reference (``strategy_reference.ref_window_scores`` and ``ref_select``) is written from the
paper's definition (observation-window softmax scores, pooling over keys, GQA group sums, "last
window always kept" + top-k with ties to the earlier index) and uses nothing from
``kvpress_like.selection``. Masks are compared exactly, scores with a float
tolerance.

Exactness: inputs are built from small pools of vectors with entries in {-1, 0, 1} * scale, so
dot products are exact and exact ties (repeated keys, max-pooling plateaus, zero-probability keys)
are common. Summation order still differs between reference and library, so a draw whose two score
tensors *rank* some pair of valid entries differently (a float near-tie, not a real difference:
the scores are asserted close first) is skipped with ``assume``.
"""

from __future__ import annotations

from functools import partial

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like.strategies.fastkv import FastKV

from strategy_reference import (
    budget_of,
    budget_settings,
    grid_shape,
    grid_view,
    make_strategy,
    make_view,
    one_hot,
    padded_lengths,
    ref_pool,
    ref_select,
    ref_window_scores,
    same_ranking,
)

make_fastkv = partial(make_strategy, FastKV)

# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(40))
    cfg = {"pooling": draw(st.sampled_from(["max", "avg"])), "kernel": draw(st.sampled_from([1, 3, 5, 7]))}
    cfg.update(draw(budget_settings(lengths, kinds=("tsp", "retain"))))
    num_layers = draw(st.integers(1, 4))
    cfg["tsp_layer"] = draw(st.integers(0, num_layers - 1))
    shape = draw(grid_shape(seq, lengths))
    shape.update(layer_idx=draw(st.integers(0, num_layers - 1)), num_layers=num_layers)
    return lengths, cfg, shape


@settings(max_examples=200, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """Scores match the reference closely; retain and propagate masks match it exactly.

    scale 0.5 gives soft attention, scale 32 near one-hot attention (exact 0/1 probabilities).
    """
    lengths, cfg, s = case
    _, view = grid_view(lengths, s)
    strategy = make_fastkv(s["hkv"] * s["groups"], s["hkv"], s["num_layers"], **cfg)

    scores = strategy.score(layer=view)
    expected = ref_window_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"])
    assert scores.shape == (s["batch"], s["hkv"], s["seq"])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    valid3 = view.valid[:, None].expand_as(scores)
    assume(same_ranking(scores, expected, valid3))
    assume(same_ranking(scores.sum(1), expected.sum(1), view.valid))

    # constant mode sets only *_tokens, proportional only *_rate
    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_select(expected, view, cfg["window"], budget_of(cfg, "retain")))
    prop = strategy.propagate(layer=view, scores=scores)
    if s["layer_idx"] != cfg["tsp_layer"]:
        assert prop is None
    else:
        assert torch.equal(prop, ref_select(expected.sum(1), view, cfg["window"], budget_of(cfg, "tsp")))


# ---------------------------------------------------------------- hand-made examples


def test_window_one_keeps_the_key_the_last_query_attends_to():
    """Window 1, budget 2: the last token is always kept, plus key 2, the one it attends to."""
    keys = one_hot(6, 4, {2: 0})[None, None]
    queries = one_hot(6, 4, {5: 0})[None, None]
    view = make_view(queries, keys, [6])
    fastkv = make_fastkv(1, 1, window=1, kernel=1, tsp_layer=0, budget_mode="constant",
                         retain_tokens=2, tsp_tokens=2)  # fmt: skip
    scores = fastkv.score(layer=view)
    assert int(scores[0, 0].argmax()) == 2
    expected = torch.tensor([False, False, True, False, False, True])
    assert torch.equal(fastkv.retain(layer=view, scores=scores)[0, 0], expected)
    assert torch.equal(fastkv.propagate(layer=view, scores=scores)[0], expected)


def test_exact_tie_goes_to_the_earlier_position():
    """Identical keys at 3 and 5 (row left-padded by 2) tie exactly: the earlier one, 3, is kept."""
    keys = one_hot(8, 4, {3: 0, 5: 0})[None, None]
    queries = one_hot(8, 4, {7: 0})[None, None]
    view = make_view(queries, keys, [6])
    fastkv = make_fastkv(1, 1, window=1, kernel=1, tsp_layer=0, retain_rate=0.34, tsp_rate=0.34)
    scores = fastkv.score(layer=view)
    assert scores[0, 0, 3] == scores[0, 0, 5] > scores[0, 0, 4]
    expected = torch.zeros(8, dtype=torch.bool)
    expected[[3, 7]] = True  # budget round(0.34 * 6) = 2: the last token and the earlier tie
    assert torch.equal(fastkv.retain(layer=view, scores=scores)[0, 0], expected)
    assert torch.equal(fastkv.propagate(layer=view, scores=scores)[0], expected)


def test_max_pooling_plateau_keeps_its_first_entry():
    """Max pooling (kernel 3) spreads the peak at key 4 over keys 3..5; the tie goes to key 3."""
    keys = one_hot(8, 4, {4: 0})[None, None]
    queries = one_hot(8, 4, {7: 0})[None, None]
    view = make_view(queries, keys, [8])
    fastkv = make_fastkv(1, 1, window=1, kernel=3, pooling="max", budget_mode="constant",
                         retain_tokens=2, tsp_tokens=2)  # fmt: skip
    scores = fastkv.score(layer=view)
    assert scores[0, 0, 3] == scores[0, 0, 4] == scores[0, 0, 5]
    keep = fastkv.retain(layer=view, scores=scores)[0, 0]
    assert keep.nonzero().flatten().tolist() == [3, 7]


def test_gqa_pairs_query_head_h_with_kv_head_h_div_groups():
    """Hq=4, Hkv=2: query heads 0,1 read KV head 0 and 2,3 read KV head 1 (h // G, not h % Hkv).

    Both KV heads hold e0 at key 1 and e1 at key 3. Query heads: 0 and 3 look nowhere in
    particular, 1 looks for e0, 2 for e1. With h // G, KV head 0 (heads 0,1) favours key 1 and
    KV head 1 (heads 2,3) key 3; pairing by h % Hkv would swap them.
    """
    keys = one_hot(6, 4, {1: 0, 3: 1})[None, None].repeat(1, 2, 1, 1)
    queries = torch.zeros(1, 4, 6, 4)
    queries[0, 1, 5, 0] = queries[0, 2, 5, 1] = 8.0
    view = make_view(queries, keys, [6])
    fastkv = make_fastkv(4, 2, window=1, kernel=1, budget_mode="constant", retain_tokens=2, tsp_tokens=2)
    scores = fastkv.score(layer=view)
    keep = fastkv.retain(layer=view, scores=scores)
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 5]
    assert keep[0, 1].nonzero().flatten().tolist() == [3, 5]

    right = ref_window_scores(view, 1, "max", 1)
    wrong = ref_window_scores(view, 1, "max", 1, kv_head_of=lambda h, _hq, hkv: h % hkv)
    torch.testing.assert_close(scores, right)
    budget = lambda n: 2  # noqa: E731
    assert torch.equal(keep, ref_select(right, view, 1, budget))
    assert not torch.equal(keep, ref_select(wrong, view, 1, budget))


def test_only_the_keys_before_the_window_are_pooled():
    """The key just before the window must not borrow the window's score through pooling.

    10 tokens, window 2, average pooling over 3 keys, one more entry than the window kept. The
    window queries look for e0: key 8 (in the window) holds 1.2 e0, key 2 holds e0, every other
    key nothing. Pooled over the prefix only (the papers' rule), key 7 scores about 0 and a key
    around 2 is kept; pooled over every key (the old rule), key 7 averages in key 8's large vote
    and is kept instead.
    """
    keys = one_hot(10, 4, {2: 0})
    keys[8, 0] = 1.2 * 8.0
    queries = one_hot(10, 4, {8: 0, 9: 0})
    view = make_view(queries[None, None], keys[None, None], [10])
    fastkv = make_fastkv(
        1, 1, window=2, kernel=3, pooling="avg", budget_mode="constant", retain_tokens=3, tsp_tokens=3
    )
    scores = fastkv.score(layer=view)
    keep = fastkv.retain(layer=view, scores=scores)

    papers = ref_window_scores(view, 2, "avg", 3)
    votes = ref_window_scores(view, 2, None)
    pooled_over_all = ref_pool(votes[0, 0], "avg", 3)[None, None]
    torch.testing.assert_close(scores, papers)
    budget = lambda n: 3  # noqa: E731
    assert torch.equal(keep, ref_select(papers, view, 2, budget))
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 8, 9]  # key 1, 2, 3 tie: the earliest
    old = ref_select(pooled_over_all, view, 2, budget)
    assert old[0, 0].nonzero().flatten().tolist() == [7, 8, 9]
