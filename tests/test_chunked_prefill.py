"""``prefill_chunk``: full-attention layers prefill a chunk of tokens at a time.

The chunk's attention (its own keys causally, the earlier ones fully, merged by log-sum-exp) must
equal plain causal attention; a chunked prefill must reproduce ``model.generate`` when everything
is kept, and keep exactly what the whole-layer prefill keeps when compressing.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_like import pipeline
from kvpress_like.errors import ConfigError
from kvpress_like.prefill_attention import chunk_attention

from conftest import TINY_FASTKV, random_rows, tiny_model


@pytest.fixture
def chunk_calls(monkeypatch) -> list[int]:
    """How many chunks attended (one entry per call), so a test sees that chunking happened."""
    calls: list[int] = []

    def counted(query, *args):
        calls.append(query.shape[2])
        return chunk_attention(query, *args)

    # The package's ``pipeline`` attribute is the function; the module is imported by its name.
    monkeypatch.setattr(importlib.import_module("kvpress_like.forward"), "chunk_attention", counted)
    return calls


@settings(max_examples=25, deadline=None)
@given(
    end=st.integers(1, 70),
    chunk=st.integers(1, 70),
    groups=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_chunk_attention_equals_causal_attention(end, chunk, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    kv_heads, dim = 2, 16
    start = max(0, end - chunk)
    query = torch.randn(2, kv_heads * groups, end - start, dim, generator=gen)
    keys, values = (torch.randn(2, kv_heads, end, dim, generator=gen) for _ in range(2))
    # Reference: every query at index start + i sees keys 0 .. start + i, heads repeated for GQA.
    allowed = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    expected = F.scaled_dot_product_attention(
        query,
        keys.repeat_interleave(groups, dim=1),
        values.repeat_interleave(groups, dim=1),
        attn_mask=allowed,
        scale=0.3,
    )
    torch.testing.assert_close(chunk_attention(query, keys, values, start, 0.3), expected)


# Chunked layers per prefill of 70 tokens in chunks of 16 (5 chunks each): llama's and qwen3's
# layers but FastKV's TSP layer (2 by default, of 4: its two passes call no chunk_attention, see
# test_propagated_prefill.py), gemma3's 2 full-attention layers (its TSP layer is a sliding one),
# none of mistral's (all sliding-window).
@pytest.mark.parametrize(
    ("family", "chunked_layers"), [("llama", 3), ("qwen3", 3), ("gemma3", 2), ("mistral", 0)]
)
def test_chunked_prefill_keeping_everything_matches_generate(family, chunked_layers, chunk_calls):
    model = tiny_model(family)
    rows = random_rows([70, 70])
    ids = torch.tensor(rows)
    expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]

    keep_all = dict(tsp_rate=1.0, retain_rate=1.0, window=4)
    pipe = pipeline(model, "fastkv", prefill_chunk=16, max_new_tokens=6, stop_on_eos=False, **keep_all)
    torch.testing.assert_close(pipe.compress(rows).last_logits, logits, rtol=1e-4, atol=1e-4)
    assert chunk_calls == [16, 16, 16, 16, 6] * chunked_layers
    assert pipe(rows).token_ids == expected[:, 70:].tolist()


@pytest.mark.parametrize(
    ("strategy", "settings_"),
    [("fastkv", TINY_FASTKV), ("snapkv", dict(retain_rate=0.25, window=4)), ("h2o", dict(retain_rate=0.25))],
)
@pytest.mark.parametrize("prefill", ["eager", "compiled"])
def test_chunked_prefill_keeps_what_the_whole_layer_prefill_keeps(strategy, settings_, prefill, chunk_calls):
    model = tiny_model("llama")
    rows = random_rows([90, 90, 90])
    whole = pipeline(model, strategy, prefill_chunk=None, max_new_tokens=5, stop_on_eos=False, **settings_)
    chunked = pipeline(
        model, strategy, prefill=prefill, prefill_chunk=25, max_new_tokens=5, stop_on_eos=False, **settings_
    )
    ours, theirs = chunked.compress(rows), whole.compress(rows)
    assert chunk_calls  # 90 tokens in chunks of 25 (FastKV: 45 after its TSP layer)
    for mine, ref in zip(ours.cache.layers, theirs.cache.layers, strict=True):
        assert torch.equal(mine.valid, ref.valid)
        assert torch.equal(mine.positions[mine.valid], ref.positions[ref.valid])
        torch.testing.assert_close(mine.keys[mine.valid], ref.keys[ref.valid], rtol=1e-4, atol=1e-4)
    assert ours.stats.tokens_per_layer == theirs.stats.tokens_per_layer
    torch.testing.assert_close(ours.last_logits, theirs.last_logits, rtol=1e-4, atol=1e-4)
    assert chunked(rows).token_ids == whole(rows).token_ids


@pytest.mark.parametrize(("length", "chunk"), [(33, 16), (20, 1)])
def test_chunks_of_one_token_attend_like_the_whole_layer(length, chunk, chunk_calls):
    """A last chunk of one token (and chunks of one) attend over a single own key, which the
    fused kernels do not take: handled without them, same result."""
    model = tiny_model("llama")
    rows = random_rows([length])
    whole = pipeline(model, "fastkv", prefill_chunk=None, max_new_tokens=4, stop_on_eos=False, **TINY_FASTKV)
    chunked = pipeline(
        model, "fastkv", prefill_chunk=chunk, max_new_tokens=4, stop_on_eos=False, **TINY_FASTKV
    )
    torch.testing.assert_close(
        chunked.compress(rows).last_logits, whole.compress(rows).last_logits, rtol=1e-4, atol=1e-4
    )
    assert 1 in chunk_calls
    assert chunked(rows).token_ids == whole(rows).token_ids


def test_a_padded_batch_prefills_whole_layers_and_stays_exact(chunk_calls):
    model = tiny_model("llama")
    rows = random_rows([60, 35])
    keep_all = dict(tsp_rate=1.0, retain_rate=1.0, window=4)
    chunked = pipeline(model, "fastkv", prefill_chunk=16, max_new_tokens=5, stop_on_eos=False, **keep_all)
    whole = pipeline(model, "fastkv", prefill_chunk=None, max_new_tokens=5, stop_on_eos=False, **keep_all)
    assert chunked(rows).token_ids == whole(rows).token_ids
    assert not chunk_calls


@pytest.mark.parametrize("value", [0, -4])
def test_a_chunk_size_below_one_is_refused_before_any_work(value):
    with pytest.raises(ConfigError, match="prefill_chunk"):
        pipeline(tiny_model("llama"), "fastkv", prefill_chunk=value)
