"""Prefilling a batch a few rows at a time (``prefill_rows``): every row gets what it gets alone
(tokens, kept entries, logits), on every decode path, for strategies with uniform, per-head and
restarting prefills, and for a family with sliding-window layers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import pipeline
from kvpress_like.errors import ConfigError

from conftest import TINY_FASTKV, random_rows, tiny_model

STRATEGIES = {
    "fastkv": TINY_FASTKV,
    "adakv": dict(retain_rate=0.3, window=4),  # per-head budgets: packed layers
    "gemfilter": dict(retain_rate=0.3, window=4, filter_layer=1),  # a second prefill pass
    "full": {},
}


def _kept_positions(context, row: int) -> list[list[list[int]]]:
    """Per layer and KV head, the positions kept for one row, in slot order."""
    out = []
    for layer in context.cache.layers:
        dense = layer.dense()
        out.append([p[v].tolist() for p, v in zip(dense.positions[row], dense.valid[row], strict=True)])
    return out


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    strategy=st.sampled_from(sorted(STRATEGIES)),
    lengths=st.lists(st.integers(24, 90), min_size=2, max_size=5),
    rows_per_part=st.integers(1, 3),
    seed=st.integers(0, 50),
)
def test_each_row_of_a_part_wise_prefill_is_the_row_alone(family, strategy, lengths, rows_per_part, seed):
    model = tiny_model(family)
    pipe = pipeline(model, strategy, **STRATEGIES[strategy])
    prompts = random_rows(lengths, seed)
    joined = pipeline(model, strategy, **STRATEGIES[strategy], prefill_rows=rows_per_part).compress(prompts)
    for row, prompt in enumerate(prompts):
        alone = pipe.compress([prompt])
        assert _kept_positions(joined, row) == _kept_positions(alone, 0)
        torch.testing.assert_close(joined.last_logits[row], alone.last_logits[0], rtol=1e-5, atol=1e-5)
    assert joined.stats.prompt_tokens == lengths
    assert joined.cache.nbytes() == sum(pipe.compress([p]).cache.nbytes() for p in prompts)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_part_wise_prefill_generates_the_whole_batchs_tokens(decode):
    model = tiny_model("llama")
    prompts = random_rows([60, 23, 41, 77, 35], seed=4)
    pipe = pipeline(
        model, "adakv", retain_rate=0.3, window=4, max_new_tokens=6, stop_on_eos=False, decode=decode
    )
    whole = pipe(prompts)
    parts = pipe(prompts, prefill_rows=2)
    assert parts.token_ids == whole.token_ids
    assert parts.stats.kv_kept_per_layer == whole.stats.kv_kept_per_layer
    assert parts.stats.tokens_per_layer == whole.stats.tokens_per_layer


def test_prefill_rows_must_be_positive():
    with pytest.raises(ConfigError, match=r"prefill_rows: Input should be greater than or equal to 1"):
        pipeline(tiny_model("llama"), "full", prefill_rows=0)
