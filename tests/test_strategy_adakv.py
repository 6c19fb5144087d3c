"""Ada-KV checked against an independent plain-PyTorch reference written from the paper.

The reference selection, per row (``n`` prompt tokens, uniform budget ``k``, ``w = min(window, n)``,
``H`` KV heads, ``f = floor(floor * (k - w))``): every head keeps its ``w`` most recent tokens, then
its own ``f`` best other entries (the safeguard), then the best ``H * (k - w - f)`` of all the
entries still left, compared across heads jointly; ties go to the earlier position within a head
and to the lower head, then the earlier position, across heads. The per-head part is
``strategy_reference.ref_keep``, the reference scores ``ref_window_scores`` there. It uses nothing
from ``kvpress_like.selection`` or ``kvpress_like.budget``.

Exactness: hook-level inputs come from tiny value sets (scores in {0, 1, 2}; queries and keys from a
pool of at most 4 vectors with entries in {-1, 0, 1} * scale), so exact ties, within and across
heads, are common. Float near-ties between the two score computations are skipped with ``assume``.
"""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import pipeline
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.strategies.adakv import AdaKV

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
    make_view,
    padded_lengths,
    ref_budget,
    ref_keep,
    ref_window_scores,
    same_ranking,
    smollm2_passkey_run,
)

make_adakv = partial(make_strategy, AdaKV)

# ---------------------------------------------------------------- reference (paper definition)


def ref_guaranteed(n: int, uniform: int, window: int, floor: float) -> int:
    """Entries every head keeps whatever the other heads' scores: its window plus the safeguard."""
    w = min(window, n)
    return w + math.floor(floor * (uniform - w))


def ref_adakv_keep(
    scores: torch.Tensor, valid: torch.Tensor, window: int, row_budgets: list[int], floor: float
) -> torch.Tensor:
    """Window, safeguard, then one top-k over all heads. ``scores`` [B, H, S], ``valid`` [B, S]."""
    batch, heads, seq = scores.shape
    lengths = valid.sum(-1).tolist()
    guaranteed = [ref_guaranteed(n, k, window, floor) for n, k in zip(lengths, row_budgets, strict=True)]
    out = ref_keep(scores, valid, window, guaranteed)  # every head: its window, then its safeguard
    for b in range(batch):
        left = [(h, j) for h in range(heads) for j in range(seq) if valid[b, j] and not out[b, h, j]]
        left.sort(key=lambda hj: (-float(scores[b, hj[0], hj[1]]), hj[0], hj[1]))
        for h, j in left[: heads * (row_budgets[b] - guaranteed[b])]:
            out[b, h, j] = True
    return out


# ---------------------------------------------------------------- property tests


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(40))
    cfg: dict = {"floor": draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]) | st.floats(0.0, 1.0))}
    cfg.update(draw(budget_settings(lengths)))
    cfg.update(pooling=draw(st.sampled_from(["max", "avg"])), kernel=draw(st.sampled_from([1, 3, 5])))
    return lengths, cfg, draw(grid_shape(seq, lengths, max_hkv=4))


def build(lengths, cfg, s):
    gen, view = grid_view(lengths, s)
    strategy = make_adakv(s["hkv"] * s["groups"], s["hkv"], **cfg)
    strategy.check_prompt(lengths)  # the settings are valid for these prompts
    return gen, view, strategy, [budget_of(cfg)(n) for n in lengths]


def assert_budgets(counts: torch.Tensor, lengths: list[int], cfg: dict) -> None:
    """Per-head counts ``[B, H]``: each head keeps its guaranteed entries (and at most the prompt),
    the heads of a row keep H x the uniform budget together."""
    heads = counts.shape[1]
    for row, n in zip(counts.tolist(), lengths, strict=True):
        k = budget_of(cfg)(n)
        assert sum(row) == heads * k
        assert all(ref_guaranteed(n, k, cfg["window"], cfg["floor"]) <= c <= n for c in row)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_retain_matches_reference_on_tied_scores(case):
    """Scores from {0, 1, 2} (many exact ties within and across heads): masks equal exactly."""
    lengths, cfg, s = case
    gen, view, strategy, row_budgets = build(lengths, cfg, s)
    scores = torch.randint(0, 3, (s["batch"], s["hkv"], s["seq"]), generator=gen).float()
    keep = strategy.retain(layer=view, scores=scores)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep, ref_adakv_keep(scores, view.valid, cfg["window"], row_budgets, cfg["floor"]))
    assert_budgets(keep.sum(-1), lengths, cfg)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_score_and_retain_match_reference(case):
    """The hooks chained as the pipeline does: scores close to the reference, masks exact. The
    joint top-k compares heads, so the two score tensors must rank every pair of a row alike."""
    lengths, cfg, s = case
    _, view, strategy, row_budgets = build(lengths, cfg, s)
    scores = strategy.score(layer=view)
    expected = ref_window_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    flat_valid = view.valid[:, None].expand_as(scores).reshape(s["batch"], -1)
    assume(same_ranking(scores.reshape(s["batch"], -1), expected.reshape(s["batch"], -1), flat_valid))
    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_adakv_keep(expected, view.valid, cfg["window"], row_budgets, cfg["floor"]))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_floor_one_is_the_uniform_per_head_budget(case):
    """floor = 1: the safeguard is the whole budget, every head keeps exactly k (SnapKV-like)."""
    lengths, cfg, s = case
    gen, view, strategy, row_budgets = build(lengths, {**cfg, "floor": 1.0}, s)
    scores = torch.randint(0, 3, (s["batch"], s["hkv"], s["seq"]), generator=gen).float()
    keep = strategy.retain(layer=view, scores=scores)
    assert keep.sum(-1).tolist() == [[k] * s["hkv"] for k in row_budgets]


# ---------------------------------------------------------------- hand-made examples


def hand_view(scores: torch.Tensor) -> LayerView:
    """A one-row view for hand-made scores ``[1, H, S]`` (the retain hook reads only the masks)."""
    _, heads, seq = scores.shape
    return make_view(torch.zeros(1, heads, seq, 4), torch.zeros(1, heads, seq, 4), [seq])


CONCENTRATED_VS_SPREAD = torch.tensor([[[9.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [5.0, 5, 5, 5, 5, 0, 0, 0, 0, 0]]])


@pytest.mark.parametrize(
    ("floor", "head0", "head1"),
    [
        # f = 0: 6 joint picks: head 0's 9, head 1's five 5s.
        (0.0, [0, 9], [0, 1, 2, 3, 4, 9]),
        # f = floor(0.5 * 3) = 1 each (the 9 and the first 5), then 4 joint picks: head 1's other 5s.
        (0.5, [0, 9], [0, 1, 2, 3, 4, 9]),
        # f = floor(0.7 * 3) = 2 each: head 0 adds its first 0 (earlier position), head 1 two 5s;
        # the 2 joint picks are head 1's next 5s (the last 5 loses to the lower budget).
        (0.7, [0, 1, 9], [0, 1, 2, 3, 9]),
        # f = 3: uniform, 3 best + the window per head (head 0's ties go to earlier positions).
        (1.0, [0, 1, 2, 9], [0, 1, 2, 9]),
    ],
)
def test_a_concentrated_head_gives_its_share_to_a_spread_one(floor, head0, head1):
    """Two heads, budget 4 each (window 1): the layer keeps 8 entries, split by the scores."""
    adakv = make_adakv(2, 2, floor=floor, window=1, budget_mode="constant", retain_tokens=4)
    scores = CONCENTRATED_VS_SPREAD
    keep = adakv.retain(layer=hand_view(scores), scores=scores)
    assert keep[0, 0].nonzero().flatten().tolist() == head0
    assert keep[0, 1].nonzero().flatten().tolist() == head1


def test_ties_across_heads_go_to_the_lower_head():
    scores = torch.ones(1, 2, 10)
    adakv = make_adakv(2, 2, floor=0.0, window=1, budget_mode="constant", retain_tokens=4)
    keep = adakv.retain(layer=hand_view(scores), scores=scores)
    assert keep[0].sum(-1).tolist() == [7, 1]  # 6 joint picks, all from head 0
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 9]


def test_hooks_read_nothing_back_to_the_host():
    """Meta tensors hold no data, so any host sync (item, int, bool, nonzero) would raise."""
    assert_hooks_read_nothing_back(make_adakv(6, 3, window=4, retain_rate=0.2), hq=6, hkv=3)


# ---------------------------------------------------------------- end to end

SETTINGS = {"retain_rate": 0.2, "window": 4, "floor": 0.2}


class ScoreRecorder:
    """Answers ``score`` on top of the strategy with the same scores, and records what it saw."""

    def __init__(self, **cfg) -> None:
        self.scorer = make_adakv(1, 1, **cfg)
        self.seen: dict[int, tuple[LayerView, torch.Tensor]] = {}

    @hookimpl
    def score(self, layer: LayerView) -> torch.Tensor:
        scores = self.scorer.score(layer=layer)
        self.seen[layer.layer_idx] = (layer, scores)
        return scores


@each_family
@each_context_batch
def test_pipeline_keeps_the_budgets_and_the_reference_choice(family, rows):
    model = tiny_model(family)
    lengths = [len(r) for r in rows]
    kv_heads = model.config.num_key_value_heads
    out = pipeline(model, "adakv", max_new_tokens=3, **SETTINGS)(rows)
    assert out.stats.kv_kept_per_layer == [[float(ref_budget(n, 0.2, None)) for n in lengths]] * len(
        model.model.layers
    )
    recorder = ScoreRecorder(**SETTINGS)
    cache = pipeline(model, "adakv", plugins=[recorder], **SETTINGS).compress(rows).cache
    uneven = 0
    for i, layer in enumerate(cache.layers):
        counts = layer.valid.sum(-1)  # [B, Hkv]
        assert counts.shape == (len(rows), kv_heads)
        assert_budgets(counts, lengths, SETTINGS)
        uneven += int((counts != counts[:, :1]).any())
        # Each head holds exactly the positions the reference picks from that layer's scores.
        view, scores = recorder.seen[i]
        budgets = [ref_budget(n, 0.2, None) for n in lengths]
        expected = ref_adakv_keep(scores, view.valid, SETTINGS["window"], budgets, SETTINGS["floor"])
        positions, valid = layer.positions, layer.valid
        for b in range(len(rows)):
            for h in range(kv_heads):
                kept = sorted(positions[b, h][valid[b, h]].tolist())
                assert kept == view.positions[b][expected[b, h]].tolist()
    assert uneven > 0, "the heads should not all keep the same number of entries"


@each_family
@each_context_batch
def test_keep_everything_reproduces_the_full_cache(family, rows):
    model = tiny_model(family)
    out, full = keep_everything_and_full(model, "adakv", rows, max_new_tokens=8, window=4)
    assert len({t for row in full.token_ids for t in row}) > 2, "degenerate reference"
    assert out.stats.kv_kept_per_layer == [[float(len(r)) for r in rows]] * model.config.num_hidden_layers


@bad_settings(
    [
        ({"floor": 1.5}, ["adakv.floor", "less than or equal to 1", "1.5"]),
        ({"floor": -0.1}, ["adakv.floor", "greater than or equal to 0", "-0.1"]),
        ({"retain_rate": 1.2}, ["adakv.retain_rate", "less than or equal to 1", "1.2"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"flor": 0.2}, ["adakv.flor", "Extra inputs are not permitted"]),
    ]
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    config_error("adakv", settings, expected)


def test_window_larger_than_budget_fails_before_prefill():
    message = config_error("adakv", dict(window=8, retain_rate=0.1), prompt=list(range(3, 43)))
    assert re.search(r"adakv\.window.*keeps 4 tokens.*window=8", message)


@pytest.mark.slow
def test_smollm2_short_prompt_keeps_the_budgets(smollm2):
    pipe, prompt, out = smollm2_passkey_run(smollm2, "adakv")
    n = out.stats.prompt_tokens[0]
    k = ref_budget(n, 0.1, None)
    assert out.stats.kv_kept_per_layer == [[float(k)]] * smollm2[0].config.num_hidden_layers
    assert 1 <= len(out.ids) <= 5
    cache = pipe.compress(prompt.text).cache
    defaults = {"retain_rate": 0.1, "window": 8, "floor": 0.2}
    for layer in cache.layers:
        assert_budgets(layer.valid.sum(-1), [n], defaults)
