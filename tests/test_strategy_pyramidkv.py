"""PyramidKV checked against an independent plain-PyTorch reference written from the paper.

The reference schedule is the paper's definition taken literally, in exact rational arithmetic
(``fractions.Fraction``): per row, every layer keeps the ``w = min(window, n)`` most recent tokens
plus a share of ``a = budget - w`` that falls linearly from ``first = 2a - a / beta`` (layer 0) to
``last = a / beta`` (layer L-1); a first layer that would exceed the prompt is flattened to
``n - w`` (same mean); integer budgets are the floors of the shares plus one for the layers with
the largest fractional parts (largest-remainder apportionment, shallower first). The reference
selection (``strategy_reference.ref_keep``) keeps, per KV head, the window plus the best other
entries (ties to the earlier position); the reference scores are ``ref_window_scores`` there.
Nothing from ``kvpress_like.selection`` or ``kvpress_like.budget`` is used by it.

Exactness: hook-level inputs come from tiny value sets (scores in {0, 1, 2}; queries and keys from a
pool of at most 4 vectors with entries in {-1, 0, 1} * scale), so exact ties are common; beta is
drawn as a fraction with a small denominator, which the strategy recovers exactly. Float near-ties
between the two score computations are skipped with ``assume``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import pipeline
from kvpress_like.strategies.pyramidkv import PyramidKV

from conftest import tiny_model
from strategy_reference import (
    assert_hooks_read_nothing_back,
    bad_settings,
    budget_of,
    budget_settings,
    config_error,
    each_context_batch,
    each_family,
    grid_shape,
    grid_view,
    keep_everything_and_full,
    make_strategy,
    padded_lengths,
    ref_budget,
    ref_keep,
    ref_window_scores,
    same_ranking,
    smollm2_passkey_run,
)

make_pyramid = partial(make_strategy, PyramidKV)

# ---------------------------------------------------------------- reference (paper definition)


def ref_schedule(n: int, uniform: int, window: int, beta: Fraction, layers: int) -> list[int]:
    """Per-layer budgets of one row (window included), from the paper's linear pyramid."""
    w = min(window, n)
    if layers == 1:
        return [uniform]
    a = Fraction(uniform - w)
    first = a * (2 - 1 / beta)
    if w + first > n:  # flatten: the first layer keeps the whole prompt, the mean stays a
        first = Fraction(n - w)
    last = 2 * a - first
    shares = [first - (first - last) * Fraction(i, layers - 1) for i in range(layers)]
    assert sum(shares) == layers * a
    floors = [math.floor(x) for x in shares]
    spare = int(layers * a) - sum(floors)
    by_remainder = sorted(range(layers), key=lambda i: (-(shares[i] - floors[i]), i))
    return [w + floors[i] + (i in by_remainder[:spare]) for i in range(layers)]


# ---------------------------------------------------------------- property tests

betas = st.builds(Fraction, st.integers(1, 400), st.integers(1, 8)).filter(lambda f: f >= 1)


@st.composite
def beta_budget_settings(draw, lengths: list[int]) -> dict:
    """Valid budget settings for these prompt lengths (the window fits every budget), with a beta."""
    return {"beta": draw(betas), **draw(budget_settings(lengths))}


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(40))
    cfg = draw(beta_budget_settings(lengths))
    cfg.update(pooling=draw(st.sampled_from(["max", "avg"])), kernel=draw(st.sampled_from([1, 3, 5])))
    num_layers = draw(st.integers(1, 6))
    shape = draw(grid_shape(seq, lengths))
    shape.update(layer_idx=draw(st.integers(0, num_layers - 1)), num_layers=num_layers)
    return lengths, cfg, shape


def build(lengths, cfg, s):
    gen, view = grid_view(lengths, s)
    hq = s["hkv"] * s["groups"]
    strategy = make_pyramid(hq, s["hkv"], s["num_layers"], **{**cfg, "beta": float(cfg["beta"])})
    strategy.check_prompt(lengths)  # the settings are valid for these prompts
    expected_budgets = [
        ref_schedule(n, budget_of(cfg)(n), cfg["window"], cfg["beta"], s["num_layers"])[s["layer_idx"]]
        for n in lengths
    ]
    return gen, view, strategy, expected_budgets


@settings(max_examples=300, deadline=None)
@given(cases())
def test_retain_matches_reference_on_tied_scores(case):
    """Scores from {0, 1, 2} (many exact ties, padding scored too): masks equal exactly."""
    lengths, cfg, s = case
    gen, view, strategy, row_budgets = build(lengths, cfg, s)
    scores = torch.randint(0, 3, (s["batch"], s["hkv"], s["seq"]), generator=gen).float()
    keep = strategy.retain(layer=view, scores=scores)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep, ref_keep(scores, view.valid, cfg["window"], row_budgets))
    assert keep.sum(-1).tolist() == [[k] * s["hkv"] for k in row_budgets]


@settings(max_examples=150, deadline=None)
@given(cases())
def test_score_and_retain_match_reference(case):
    """The hooks chained as the pipeline does: scores close to the reference, masks exact."""
    lengths, cfg, s = case
    _, view, strategy, row_budgets = build(lengths, cfg, s)
    scores = strategy.score(layer=view)
    expected = ref_window_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assume(same_ranking(scores, expected, view.valid[:, None].expand_as(scores)))
    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_keep(expected, view.valid, cfg["window"], row_budgets))


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.data())
def test_schedule_matches_reference_and_keeps_the_uniform_total(n, num_layers, data):
    cfg = data.draw(beta_budget_settings([n]))
    strategy = make_pyramid(1, 1, num_layers, **{**cfg, "beta": float(cfg["beta"])})
    uniform = budget_of(cfg)(n)
    expected = ref_schedule(n, uniform, cfg["window"], cfg["beta"], num_layers)
    got = [int(strategy.layer_budgets(i, torch.tensor([n]))[0]) for i in range(num_layers)]
    assert got == expected
    assert sum(got) == num_layers * uniform
    assert all(min(cfg["window"], n) <= k <= n for k in got)
    assert got == sorted(got, reverse=True)


# ---------------------------------------------------------------- hand-made examples


def schedule(num_layers: int, n: int, **cfg) -> list[int]:
    strategy = make_pyramid(1, 1, num_layers, **cfg)
    return [int(strategy.layer_budgets(i, torch.tensor([n]))[0]) for i in range(num_layers)]


def test_default_beta_pyramid_by_hand():
    """n=100, budget 20, window 4, beta 20: shares 31.2, 21.07, 10.93, 0.8; floors 31, 21, 10, 0
    leave 2 of 64, which go to layers 2 (.93) and 3 (.8); plus the window each."""
    assert schedule(4, 100, retain_rate=0.2, window=4) == [35, 25, 15, 5]


def test_first_layer_is_clipped_to_the_prompt_and_the_total_kept():
    """n=30, budget 20, window 4: 4 + 16 * 1.95 > 30, so first = 26, last = 6 (mean 16 kept):
    shares 26, 19.33, 12.67, 6; the one left over goes to layer 2 (.67)."""
    assert schedule(4, 30, budget_mode="constant", retain_tokens=20, window=4) == [30, 23, 17, 10]


def test_beta_one_is_uniform_and_one_layer_keeps_the_budget():
    assert schedule(5, 100, retain_rate=0.2, window=4, beta=1.0) == [20] * 5
    assert schedule(1, 100, retain_rate=0.2, window=4) == [20]


def test_huge_beta_leaves_the_last_layer_its_window_only():
    """1 / beta is taken as a fraction with denominator <= 1000: 1e-9 becomes 0, so shares are
    32, 21.33, 10.67, 0 (the one left over goes to layer 2)."""
    assert schedule(4, 100, retain_rate=0.2, window=4, beta=1e9) == [36, 25, 15, 4]


def test_batch_rows_get_their_own_schedules():
    strategy = make_pyramid(1, 1, 4, retain_rate=0.2, window=4)
    got = torch.stack([strategy.layer_budgets(i, torch.tensor([100, 37])) for i in range(4)])
    # Row 2: n=37, budget 7, shares 5.85, 3.95, 2.05, 0.15: floors 5, 3, 2, 0, and the 2 left over
    # go to layers 1 (.95) and 0 (.85).
    assert got.tolist() == [[35, 10], [25, 8], [15, 6], [5, 4]]


def test_hooks_read_nothing_back_to_the_host():
    """Meta tensors hold no data, so any host sync (item, int, bool, nonzero) would raise."""
    assert_hooks_read_nothing_back(make_pyramid(6, 3, 6, window=4, retain_rate=0.2), hq=6, hkv=3)


# ---------------------------------------------------------------- end to end

SETTINGS = {"retain_rate": 0.2, "window": 4, "beta": 4.0}


@each_family
@each_context_batch
def test_pipeline_keeps_the_schedule(family, rows):
    model = tiny_model(family)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    pipe = pipeline(model, "pyramidkv", max_new_tokens=3, **SETTINGS)
    per_row = [
        ref_schedule(len(r), ref_budget(len(r), 0.2, None), 4, Fraction(4), layers) for r in rows
    ]  # [row][layer]
    expected = [[per_row[b][i] for b in range(len(rows))] for i in range(layers)]
    assert len({tuple(e) for e in expected}) == layers, "the schedule should differ per layer"
    out = pipe(rows)
    assert out.stats.kv_kept_per_layer == [[float(k) for k in e] for e in expected]
    cache = pipe.compress(rows).cache
    for i, layer in enumerate(cache.layers):
        assert layer.valid.sum(-1).tolist() == [[k] * kv_heads for k in expected[i]]


@each_family
@each_context_batch
def test_keep_everything_reproduces_the_full_cache(family, rows):
    model = tiny_model(family)
    out, full = keep_everything_and_full(model, "pyramidkv", rows, max_new_tokens=8, window=4)
    assert len({t for row in full.token_ids for t in row}) > 2, "degenerate reference"
    assert out.stats.kv_kept_per_layer == [[float(len(r)) for r in rows]] * model.config.num_hidden_layers


@bad_settings(
    [
        ({"beta": 0.5}, ["pyramidkv.beta", "greater than or equal to 1", "0.5"]),
        ({"retain_rate": 0.0}, ["pyramidkv.retain_rate", "greater than 0", "0.0"]),
        ({"kernel": 4}, ["kernel: must be odd", "4"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"betta": 2}, ["pyramidkv.betta", "Extra inputs are not permitted"]),
    ]
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    config_error("pyramidkv", settings, expected)


def test_window_larger_than_budget_fails_before_prefill():
    message = config_error("pyramidkv", dict(window=8, retain_rate=0.1), prompt=list(range(3, 43)))
    assert re.search(r"pyramidkv\.window.*keeps 4 tokens.*window=8", message)


@pytest.mark.slow
def test_smollm2_short_prompt_keeps_the_schedule(smollm2):
    _, _, out = smollm2_passkey_run(smollm2, "pyramidkv")
    n, layers = out.stats.prompt_tokens[0], smollm2[0].config.num_hidden_layers
    expected = ref_schedule(n, ref_budget(n, 0.1, None), 8, Fraction(20), layers)
    assert sum(expected) == layers * ref_budget(n, 0.1, None) and expected[0] > expected[-1]
    assert out.stats.kv_kept_per_layer == [[float(k)] for k in expected]
    assert 1 <= len(out.ids) <= 5
