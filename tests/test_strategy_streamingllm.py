"""StreamingLLM: attention sinks plus recent tokens, checked against a plain reference.

The reference below follows the paper's definition (keep the first ``sink_tokens`` tokens of the
prompt, "attention sinks", and a rolling window of the latest tokens, together filling the cache
budget) with plain Python loops over each row's valid entries; it uses nothing from
``kvpress_like.selection``. Masks are compared exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import ConfigError, pipeline
from kvpress_like.hookspecs import LayerView
from kvpress_like.passkey import passkey_prompt
from kvpress_like.plugins import ModelInfo
from kvpress_like.strategies.streamingllm import StreamingLLM, StreamingLLMConfig

from conftest import tiny_model

NAME = "streamingllm"

# ---------------------------------------------------------------- reference (paper definition)


def ref_budget(n: int, rate: float | None, tokens: int | None) -> int:
    """Rate of the prompt rounded half up (proportional) or a token count, at most the prompt."""
    return min(n, tokens) if tokens is not None else min(n, math.floor(rate * n + 0.5))


def ref_keep_row(valid: list[bool], budget: int, sinks: int) -> list[bool]:
    """The first min(sinks, budget) valid entries, then the latest ones up to the budget."""
    idx = [j for j, v in enumerate(valid) if v]
    head = min(sinks, budget)
    chosen = set(idx[:head]) | set(idx[len(idx) - (budget - head) :] if budget > head else [])
    return [j in chosen for j in range(len(valid))]


def ref_retain(view: LayerView, kv_heads: int, sinks: int, budget_of) -> torch.Tensor:
    batch, seq = view.valid.shape
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.bool)
    for b in range(batch):
        row = ref_keep_row(view.valid[b].tolist(), budget_of(int(view.prompt_lengths[b])), sinks)
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


def make_view(batch: int, hq: int, hkv: int, lengths: list[int], seq: int, seed: int = 0) -> LayerView:
    """Left-padded prefill view: row b has its lengths[b] tokens at the right, positions 0..n-1."""
    gen = torch.Generator().manual_seed(seed)
    dim = 4
    valid = torch.zeros(batch, seq, dtype=torch.bool)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        valid[b, seq - n :] = True
        positions[b, seq - n :] = torch.arange(n)
    keys = torch.randn(batch, hkv, seq, dim, generator=gen)
    queries = torch.randn(batch, hq, seq, dim, generator=gen)
    return LayerView(0, 1, queries, keys, torch.randn_like(keys), positions, valid,
                     torch.tensor(lengths), dim**-0.5, None)  # fmt: skip


def make_strategy(hq: int, hkv: int, **cfg) -> StreamingLLM:
    return StreamingLLM(StreamingLLMConfig(**cfg), ModelInfo(1, hq, hkv, ("full_attention",)))


# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq = draw(st.integers(1, 40))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)] if draw(st.booleans()) else [seq] * batch
    window = draw(st.integers(1, 8))
    sinks = draw(st.integers(0, 8))
    if draw(st.booleans()):
        cfg = dict(budget_mode="constant", window=window, sink_tokens=sinks,
                   retain_tokens=draw(st.integers(sinks + window, 45)))  # fmt: skip
    else:
        cfg = dict(window=window, sink_tokens=sinks, retain_rate=draw(st.floats(0.05, 1.0)))
    shape = dict(batch=batch, seq=seq, hkv=draw(st.integers(1, 3)), groups=draw(st.integers(1, 3)),
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
    view = make_view(s["batch"], hq, s["hkv"], lengths, s["seq"], s["seed"])
    strategy = make_strategy(hq, s["hkv"], **cfg)

    def budget_of(n):
        return ref_budget(n, cfg.get("retain_rate"), cfg.get("retain_tokens"))

    keep = strategy.retain(layer=view, scores=None)
    assert keep.dtype == torch.bool and keep.shape == (s["batch"], s["hkv"], s["seq"])
    assert torch.equal(keep, ref_retain(view, s["hkv"], cfg["sink_tokens"], budget_of))
    assert keep.sum(-1).tolist() == [[budget_of(n)] * s["hkv"] for n in lengths]

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
    view = make_view(1, 2, 1, [10], 13)
    strategy = make_strategy(2, 1, budget_mode="constant", retain_tokens=6, window=2, sink_tokens=2)
    keep = strategy.retain(layer=view, scores=None)[0, 0]
    assert keep.nonzero().flatten().tolist() == [3, 4, 9, 10, 11, 12]


def test_zero_sinks_is_a_sliding_window():
    view = make_view(1, 1, 1, [10], 10)
    strategy = make_strategy(1, 1, budget_mode="constant", retain_tokens=4, window=4, sink_tokens=0)
    assert strategy.retain(layer=view, scores=None)[0, 0].nonzero().flatten().tolist() == [6, 7, 8, 9]


def test_retain_ignores_scores():
    view = make_view(1, 1, 1, [10], 10)
    strategy = make_strategy(1, 1, budget_mode="constant", retain_tokens=6, window=2)
    scores = torch.arange(10.0)[None, None]  # any plugin's scores: StreamingLLM does not use them
    assert torch.equal(strategy.retain(layer=view, scores=scores), strategy.retain(layer=view, scores=None))


# ---------------------------------------------------------------- end to end (tiny models)

ROWS = {
    "batch1": [torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()],
    "batch2-left-padded": [
        torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(4)).tolist(),
        torch.randint(3, 256, (27,), generator=torch.Generator().manual_seed(5)).tolist(),
    ],
}
BUDGETS = {
    "proportional": (dict(retain_rate=0.35, window=4, sink_tokens=4), lambda n: math.floor(0.35 * n + 0.5)),
    "constant": (dict(budget_mode="constant", retain_tokens=13, window=5, sink_tokens=3), lambda n: 13),
}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("mode", sorted(BUDGETS))
def test_budget_is_respected_end_to_end(family, rows, mode):
    model = tiny_model(family)
    cfg, budget_of = BUDGETS[mode]
    prompts = ROWS[rows]
    budgets = [budget_of(len(p)) for p in prompts]
    pipe = pipeline(model, NAME, max_new_tokens=3, stop_on_eos=False, **cfg)
    out = pipe(prompts)
    assert out.stats.kv_kept_per_layer == [[float(k) for k in budgets]] * model.config.num_hidden_layers

    context = pipe.compress(prompts)
    heads = model.config.num_key_value_heads
    for layer in context.cache.layers:
        assert layer.valid.sum(-1).tolist() == [[k] * heads for k in budgets]
        for b, (n, k) in enumerate(zip(map(len, prompts), budgets, strict=True)):
            sinks = cfg["sink_tokens"]
            expected = list(range(sinks)) + list(range(n - (k - sinks), n))
            for h in range(heads):
                kept = layer.positions[b, h][layer.valid[b, h]].tolist()
                assert kept == expected


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_keep_everything_matches_full(family, rows):
    model = tiny_model(family)
    full = pipeline(model, "full", max_new_tokens=6, stop_on_eos=False)(ROWS[rows])
    kept = pipeline(model, NAME, retain_rate=1.0, max_new_tokens=6, stop_on_eos=False)(ROWS[rows])
    assert kept.token_ids == full.token_ids
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
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 300, 0.5, seed=0)
    pipe = pipeline(model, NAME, tokenizer=tokenizer, chat_template=False, max_new_tokens=5)
    out = pipe(prompt.text)
    n = out.stats.prompt_tokens[0]
    assert 250 <= n <= 350
    budget = math.floor(0.1 * n + 0.5)  # default retain_rate
    assert out.stats.kv_kept_per_layer == [[float(budget)]] * model.config.num_hidden_layers
    assert 1 <= len(out.ids) <= 5


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"sink_tokens": -1}, ["streamingllm.sink_tokens", "greater than or equal to 0", "(got -1)"]),
        (
            {"budget_mode": "constant", "retain_tokens": 10, "sink_tokens": 4},
            ["streamingllm.sink_tokens", "sink_tokens + window (8) must be <= retain_tokens (10)", "(got 4)"],
        ),
        ({"budget_mode": "constant"}, ["retain_tokens is required"]),
        ({"retain_rate": 0.0}, ["streamingllm.retain_rate", "greater than 0", "(got 0.0)"]),
        ({"sinks": 4}, ["streamingllm.sinks", "Extra inputs are not permitted"]),
    ],
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    with pytest.raises(ConfigError) as err:
        pipeline(tiny_model("llama"), NAME, **settings)
    for fragment in expected:
        assert fragment in str(err.value)


def test_budget_without_room_for_sinks_and_window_fails_before_prefill():
    model = tiny_model("llama")
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe = pipeline(model, NAME, retain_rate=0.25, window=8, sink_tokens=4)  # 10 of 40 < 4 + 8
    with pytest.raises(ConfigError) as err:
        pipe(ROWS["batch1"])
    message = str(err.value)
    assert "streamingllm.sink_tokens" in message and "keeps 10 tokens" in message
    assert "sink_tokens + window (8)" in message and message.endswith("(got 4)")
    assert calls == []
    pipeline(model, NAME, retain_rate=0.3, window=8, sink_tokens=4, max_new_tokens=1)(
        ROWS["batch1"]
    )  # 12 fits
