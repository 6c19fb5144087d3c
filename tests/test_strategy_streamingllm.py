"""StreamingLLM: attention sinks plus recent tokens, checked against a plain reference.

The reference below follows the paper's definition (keep the first ``sink_tokens`` tokens of the
prompt, "attention sinks", and a rolling window of the latest tokens, together filling the cache
budget) with plain Python loops over each row's valid entries; it uses nothing from
``kvpress_like.selection``. Masks are compared exactly.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import ConfigError, pipeline
from kvpress_like.hookspecs import LayerView
from kvpress_like.strategies.streamingllm import StreamingLLM

from conftest import tiny_model
from strategy_reference import (
    ROWS,
    assert_smollm2_keeps_default_budget,
    bad_settings,
    budget_of,
    config_error,
    each_family,
    each_row_set,
    keep_everything_and_full,
    kept_positions_end_to_end,
    make_strategy,
    make_view,
    padded_lengths,
    ref_budget,
)

NAME = "streamingllm"
make_streamingllm = partial(make_strategy, StreamingLLM)

# ---------------------------------------------------------------- reference (paper definition)


def ref_keep_row(valid: list[bool], budget: int, sinks: int) -> list[bool]:
    """The first min(sinks, budget) valid entries, then the latest ones up to the budget."""
    idx = [j for j, v in enumerate(valid) if v]
    head = min(sinks, budget)
    chosen = set(idx[:head]) | set(idx[len(idx) - (budget - head) :] if budget > head else [])
    return [j in chosen for j in range(len(valid))]


def ref_retain(view: LayerView, kv_heads: int, sinks: int, budget) -> torch.Tensor:
    batch, seq = view.valid.shape
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.bool)
    for b in range(batch):
        row = ref_keep_row(view.valid[b].tolist(), budget(int(view.prompt_lengths[b])), sinks)
        for h in range(kv_heads):
            out[b, h] = torch.tensor(row)
    return out


def ref_refuses(lengths: list[int], rate: float, window: int, sinks: int) -> bool:
    """Proportional mode: a prompt is refused when its budget cannot hold what must be kept."""
    for n in lengths:
        k = ref_budget(n, rate, None)
        if k < min(window, n) or (k < n and k < sinks + window):
            return True
    return False


# ---------------------------------------------------------------- helpers


def random_view(batch: int, hq: int, hkv: int, lengths: list[int], seq: int, seed: int = 0) -> LayerView:
    """Left-padded prefill view of random queries and keys (StreamingLLM reads only the masks)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, hkv, seq, 4, generator=gen)
    queries = torch.randn(batch, hq, seq, 4, generator=gen)
    return make_view(queries, keys, lengths)


# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq, lengths = draw(padded_lengths(40))
    window = draw(st.integers(1, 8))
    sinks = draw(st.integers(0, 8))
    if draw(st.booleans()):
        cfg = dict(budget_mode="constant", window=window, sink_tokens=sinks,
                   retain_tokens=draw(st.integers(sinks + window, 45)))  # fmt: skip
    else:
        cfg = dict(window=window, sink_tokens=sinks, retain_rate=draw(st.floats(0.05, 1.0)))
    shape = dict(batch=len(lengths), seq=seq, hkv=draw(st.integers(1, 3)), groups=draw(st.integers(1, 3)),
                 seed=draw(st.integers(0, 2**31 - 1)))  # fmt: skip
    return lengths, cfg, shape


@settings(max_examples=300, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """retain equals the reference exactly; check_prompt refuses exactly the prompts it should.

    The hook is checked even where check_prompt would refuse the prompt: it must still keep
    exactly the budget (sinks first), never more.
    """
    lengths, cfg, s = case
    hq = s["hkv"] * s["groups"]
    view = random_view(s["batch"], hq, s["hkv"], lengths, s["seq"], s["seed"])
    strategy = make_streamingllm(hq, s["hkv"], **cfg)

    keep = strategy.retain(layer=view, scores=None)
    assert keep.dtype == torch.bool and keep.shape == (s["batch"], s["hkv"], s["seq"])
    assert torch.equal(keep, ref_retain(view, s["hkv"], cfg["sink_tokens"], budget_of(cfg)))
    assert keep.sum(-1).tolist() == [[budget_of(cfg)(n)] * s["hkv"] for n in lengths]

    if cfg.get("budget_mode") == "constant":
        strategy.check_prompt(lengths)  # the config validator already guaranteed it fits
    elif ref_refuses(lengths, cfg["retain_rate"], cfg["window"], cfg["sink_tokens"]):
        with pytest.raises(ConfigError, match=r"streamingllm\.(sink_tokens|window)"):
            strategy.check_prompt(lengths)
    else:
        strategy.check_prompt(lengths)


# ---------------------------------------------------------------- hand-made examples


def test_sinks_and_recent_on_a_padded_row():
    """Row of 10 left-padded by 3, budget 6, 2 sinks: positions 0, 1 and 6..9 (slots 3, 4, 9..12)."""
    view = random_view(1, 2, 1, [10], 13)
    strategy = make_streamingllm(2, 1, budget_mode="constant", retain_tokens=6, window=2, sink_tokens=2)
    keep = strategy.retain(layer=view, scores=None)[0, 0]
    assert keep.nonzero().flatten().tolist() == [3, 4, 9, 10, 11, 12]


def test_zero_sinks_is_a_sliding_window():
    view = random_view(1, 1, 1, [10], 10)
    strategy = make_streamingllm(1, 1, budget_mode="constant", retain_tokens=4, window=4, sink_tokens=0)
    assert strategy.retain(layer=view, scores=None)[0, 0].nonzero().flatten().tolist() == [6, 7, 8, 9]


def test_retain_ignores_scores():
    view = random_view(1, 1, 1, [10], 10)
    strategy = make_streamingllm(1, 1, budget_mode="constant", retain_tokens=6, window=2)
    scores = torch.arange(10.0)[None, None]  # any plugin's scores: StreamingLLM does not use them
    assert torch.equal(strategy.retain(layer=view, scores=scores), strategy.retain(layer=view, scores=None))


# ---------------------------------------------------------------- end to end (tiny models)

BUDGETS = {
    "proportional": (dict(retain_rate=0.35, window=4, sink_tokens=4), lambda n: math.floor(0.35 * n + 0.5)),
    "constant": (dict(budget_mode="constant", retain_tokens=13, window=5, sink_tokens=3), lambda n: 13),
}


@each_family
@each_row_set
@pytest.mark.parametrize("mode", sorted(BUDGETS))
def test_budget_is_respected_end_to_end(family, rows, mode):
    cfg, budget = BUDGETS[mode]
    prompts = ROWS[rows]
    kept = kept_positions_end_to_end(family, NAME, cfg, budget, prompts, whole_prompt_every_layer=False)
    sinks = cfg["sink_tokens"]
    for layer in kept:
        for heads, n in zip(layer, map(len, prompts), strict=True):
            k = budget(n)
            expected = list(range(sinks)) + list(range(n - (k - sinks), n))
            for positions in heads:
                assert positions == expected


@each_family
@each_row_set
def test_keep_everything_matches_full(family, rows):
    kept, full = keep_everything_and_full(tiny_model(family), NAME, ROWS[rows], max_new_tokens=6)
    assert kept.stats.kv_kept_per_layer == full.stats.kv_kept_per_layer


def test_compression_changes_the_answer():
    """Sanity for the tests above: a small budget does change what the tiny model generates."""
    model = tiny_model("llama")
    full = pipeline(model, "full", max_new_tokens=6, stop_on_eos=False)(ROWS["batch1"])
    small = pipeline(model, NAME, retain_rate=0.3, window=4, max_new_tokens=6, stop_on_eos=False)
    assert small(ROWS["batch1"]).token_ids != full.token_ids


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_short_passkey_run(smollm2):
    assert_smollm2_keeps_default_budget(smollm2, NAME)


# ---------------------------------------------------------------- bad settings


@bad_settings(
    [
        ({"sink_tokens": -1}, ["streamingllm.sink_tokens", "greater than or equal to 0", "(got -1)"]),
        (
            {"budget_mode": "constant", "retain_tokens": 10, "sink_tokens": 4},
            [
                "streamingllm.sink_tokens",
                "sink_tokens + window = 4 + 8 = 12 must be <= retain_tokens (10)",
                "(got 4)",
            ],
        ),
        ({"budget_mode": "constant"}, ["retain_tokens is required"]),
        ({"retain_rate": 0.0}, ["streamingllm.retain_rate", "greater than 0", "(got 0.0)"]),
        ({"sinks": 4}, ["streamingllm.sinks", "Extra inputs are not permitted"]),
    ]
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    config_error(NAME, settings, expected)


def test_budget_without_room_for_sinks_and_window_fails_before_prefill():
    model = tiny_model("llama")
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe = pipeline(model, NAME, retain_rate=0.25, window=8, sink_tokens=4)  # 10 of 40 < 4 + 8
    with pytest.raises(ConfigError) as err:
        pipe(ROWS["batch1"])
    message = str(err.value)
    assert "streamingllm.sink_tokens" in message and "keeps 10 tokens" in message
    assert (
        "sink_tokens + window = 4 + 8 = 12" in message
        and "(got sink_tokens=4); use a longer prompt" in message
    )
    assert calls == []
    pipeline(model, NAME, retain_rate=0.3, window=8, sink_tokens=4, max_new_tokens=1)(
        ROWS["batch1"]
    )  # 12 fits
