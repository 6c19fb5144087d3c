"""Generation features: contexts reused across questions, sampling, EOS, stats of compression."""

from __future__ import annotations

import pytest
import torch

from kvpress_like import ConfigError, pipeline
from kvpress_like.cache import PackedLayerCache

from conftest import TINY_FASTKV, tiny_model

CONTEXT = torch.randint(3, 256, (60,), generator=torch.Generator().manual_seed(7)).tolist()
QUESTIONS = [[10, 11, 12, 13], [40, 41]]


@pytest.fixture
def model():
    return tiny_model("llama")


def test_a_context_serves_several_questions_like_one_long_prompt(model):
    pipe = pipeline(model, "full", max_new_tokens=6, stop_on_eos=False)
    context = pipe.compress(CONTEXT)
    for question in QUESTIONS:
        assert pipe.generate(question, context=context).ids == pipe(CONTEXT + question).ids
    assert pipe.generate(context=context).ids == pipe(CONTEXT).ids


def test_batched_questions_on_a_batched_context(model):
    pipe = pipeline(model, "full", max_new_tokens=5, stop_on_eos=False)
    contexts = [CONTEXT, CONTEXT[:45]]
    out = pipe.generate(QUESTIONS, context=pipe.compress(contexts))
    assert out.token_ids == [pipe(c + q).ids for c, q in zip(contexts, QUESTIONS, strict=True)]
    with pytest.raises(ConfigError, match=r"one row per context row \(2\) \(got 1\)"):
        pipe.generate([QUESTIONS[0]], context=pipe.compress(contexts))


def test_compressed_context_is_not_changed_by_generating_from_it(model):
    pipe = pipeline(model, "fastkv", window=4, max_new_tokens=6, stop_on_eos=False)
    context = pipe.compress(CONTEXT)
    saved = [(lc.keys.clone(), lc.valid.clone()) for lc in context.cache.layers]
    first = pipe.generate(QUESTIONS[0], context=context).ids
    pipe.generate(QUESTIONS[1], context=context)
    assert pipe.generate(QUESTIONS[0], context=context).ids == first
    for (keys, valid), lc in zip(saved, context.cache.layers, strict=True):
        assert torch.equal(keys, lc.keys) and torch.equal(valid, lc.valid)


def test_fastkv_stats_follow_the_budgets(model):
    out = pipeline(model, "fastkv", tsp_layer=1, tsp_rate=0.5, retain_rate=0.2, window=4, max_new_tokens=3)(
        CONTEXT
    )
    assert out.stats.prompt_tokens == [60]
    assert out.stats.tokens_per_layer == [[60], [60], [30], [30]]
    assert out.stats.kv_kept_per_layer == [[12.0]] * 4
    assert out.stats.cache_bytes_kept * 5 == out.stats.cache_bytes_full
    assert out.stats.prefill_seconds > 0 and out.stats.decode_seconds_per_token > 0


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(model):
    pipe = pipeline(model, "full", max_new_tokens=12, stop_on_eos=False)
    greedy = pipe(CONTEXT).ids
    sample = dict(do_sample=True, temperature=1.5, seed=1)
    assert pipe(CONTEXT, **sample).ids == pipe(CONTEXT, **sample).ids
    assert pipe(CONTEXT, **sample).ids != pipe(CONTEXT, **{**sample, "seed": 2}).ids
    assert pipe(CONTEXT, do_sample=True, top_p=1e-6, seed=3).ids == greedy


def test_generation_stops_at_eos_like_generate(model):
    greedy = pipeline(model, "full", max_new_tokens=8, stop_on_eos=False)(CONTEXT).ids
    eos = greedy[3]
    model.generation_config.eos_token_id = eos
    expected = model.generate(torch.tensor([CONTEXT]), max_new_tokens=8, do_sample=False)[0, 60:].tolist()
    out = pipeline(model, "full", max_new_tokens=8)(CONTEXT)
    assert out.ids == expected == greedy[: greedy.index(eos) + 1]
    assert out.stats.new_tokens == (len(expected),)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_padded_batch_gives_each_row_what_it_gets_alone(family):
    """Per-row budgets: each row of a left-padded batch is compressed and decoded as if alone,
    and the uneven rows are stored packed (no padding slots kept)."""
    model = tiny_model(family)
    rows = [CONTEXT, CONTEXT[:37], CONTEXT[10:50]]
    pipe = pipeline(model, "fastkv", **TINY_FASTKV, max_new_tokens=6, stop_on_eos=False)
    batched = pipe(rows)
    alone = [pipe(row) for row in rows]
    assert batched.token_ids == [a.ids for a in alone]
    assert [row for row in zip(*batched.stats.kv_kept_per_layer, strict=True)] == [
        tuple(r[0] for r in a.stats.kv_kept_per_layer) for a in alone
    ]
    context = pipe.compress(rows)
    full_attention = [i for i, t in enumerate(pipe.adapter.layer_types) if t == "full_attention"]
    packed = context.cache.layers[full_attention[-1]]
    assert isinstance(packed, PackedLayerCache)
    assert context.cache.nbytes() == sum(a.stats.cache_bytes_kept for a in alone)


def test_mlp_chunking_changes_nothing_but_memory(model, monkeypatch):
    """Prefill runs each MLP over token slices; the logits equal the unsliced run's."""
    from kvpress_like import adapter

    pipe = pipeline(model, "fastkv", window=4, retain_rate=0.25, max_new_tokens=4, stop_on_eos=False)
    whole = pipe.compress([CONTEXT, CONTEXT[:45]]).last_logits
    monkeypatch.setattr(adapter, "MLP_CHUNK", 7)
    sliced = pipe.compress([CONTEXT, CONTEXT[:45]]).last_logits
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    assert (
        pipe([CONTEXT]).ids
        == pipeline(model, "fastkv", window=4, retain_rate=0.25, max_new_tokens=4, stop_on_eos=False)(
            [CONTEXT]
        ).ids
    )


def test_extend_continues_a_context_and_leaves_it_as_it_was(model):
    pipe = pipeline(model, "full")
    context = pipe.compress(CONTEXT)
    saved = context.last_logits.clone()
    extended = pipe.extend(context, QUESTIONS[0])
    expected = pipe.compress(CONTEXT + QUESTIONS[0]).last_logits
    torch.testing.assert_close(extended.last_logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(context.last_logits, saved)
    assert int(context.cache.next_positions[0]) == len(CONTEXT)
    with pytest.raises(ConfigError, match=r"one row per context row \(1\) \(got 2\)"):
        pipe.extend(context, QUESTIONS)
