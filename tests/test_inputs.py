"""Bad inputs are ConfigErrors naming the field, the rule and the value, raised before any model
work; the decode buffers grow with the tokens generated, not with the limit asked for."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from kvpress_like import decode, pipeline
from kvpress_like.errors import ConfigError

from conftest import TINY_FASTKV, CharTokenizer, random_rows, tiny_model

PROMPT = random_rows([40], seed=4)[0]


@pytest.fixture
def counted():
    """A tiny model that counts its embedding calls: 'before any model work' means zero."""
    model = tiny_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    yield model, calls
    handle.remove()


BAD_PROMPTS = {
    "negative id": ([[3, -1, 5]], "token ids must be in [0, 256)"),
    "id past the vocabulary": ([[3, 256, 5]], "token ids must be in [0, 256)"),
    "negative ids in a tensor": (
        torch.tensor([[3, 4, 5], [3, -1, -2]]),
        "prompts[1]: token ids must be in [0, 256), the model's vocabulary (got -1, one of 2 out of range)",
    ),
    "an id past the vocabulary in a tensor": (
        torch.tensor([300, 4], dtype=torch.int16),
        "prompts[0]: token ids must be in [0, 256), the model's vocabulary (got 300, one of 1 out of range)",
    ),
    "float tensor": (torch.tensor([[3.0, 4.0]]), "integer dtype (got torch.float32)"),
    "bool tensor": (torch.tensor([[True, False]]), "integer dtype (got torch.bool)"),
    "3-D tensor": (torch.ones(1, 2, 3, dtype=torch.long), "1-D [T] or 2-D [B, T] (got 3-D"),
    "0-D tensor": (torch.tensor(5), "1-D [T] or 2-D [B, T] (got 0-D"),
    "float list": ([3.0, 4.5], "prompts[0]: token ids must be integers (got float 3.0)"),
    "floats in a row": ([[3, 4.5]], "prompts[0]: token ids must be integers (got float 4.5)"),
    "bools in a row": ([[3, True]], "prompts[0]: token ids must be integers (got bool True)"),
    "nested too deep": ([[[3, 4]]], "prompts[0]: token ids must be integers (got list"),
    "empty row": ([[3, 4], []], "prompts[1]: must contain at least one token"),
    "None": (None, "prompts: must be given"),
    "a number": (7, "prompts: must be a non-empty"),
    "bytes": (b"abc", "prompts: must be a non-empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_a_bad_prompt_is_refused_before_any_model_work(counted, case):
    model, calls = counted
    prompts, message = BAD_PROMPTS[case]
    pipe = pipeline(model, "fastkv", **TINY_FASTKV)
    with pytest.raises(ConfigError) as caught:
        pipe(prompts)
    assert message in str(caught.value)
    assert calls == []


def test_integer_tensors_of_any_width_are_token_ids():
    model = tiny_model("llama")
    pipe = pipeline(model, "full", max_new_tokens=3)
    expected = pipe([PROMPT]).token_ids
    for dtype in (torch.int64, torch.int32, torch.int16):
        assert pipe(torch.tensor([PROMPT], dtype=dtype)).token_ids == expected
    assert pipe(torch.tensor(PROMPT)).token_ids == expected


@pytest.mark.parametrize(
    "dtype",
    [
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    ],
)
def test_a_tensor_of_ids_is_checked_as_its_list_is(dtype):
    """The tensor path (checked where it lies) against the list of the same ids: the same ids, or
    the same error, naming the first bad row, its first bad value and its count (vocabulary: 256);
    the caller's tensor is never the one the pipeline goes on with."""
    from kvpress_like.prompts import PromptEncoder

    encoder = PromptEncoder(None, tiny_model("llama"))
    info = torch.iinfo(dtype)
    low, high = max(info.min, -2), min(info.max, 2**64 - 1)  # each dtype's own extremes near the rules
    tensor = torch.tensor([[3, 4, 5], [7, low, high], [high, 1, high]], dtype=dtype)
    as_list = tensor.tolist()  # Python ints, uint64's past int64 included

    def outcome(prompts):
        try:
            ids, valid = encoder.encode(prompts, "prompt")
        except ConfigError as exc:
            return str(exc)
        assert ids.data_ptr() != getattr(prompts, "data_ptr", lambda: None)()
        return ids.tolist(), valid.tolist()

    checked = outcome(tensor)
    assert checked == outcome(as_list)
    if high >= 256 or low < 0:  # a dtype that can hold a bad id: the error is there to compare
        assert isinstance(checked, str) and "prompts[1]" in checked


def test_max_new_tokens_beyond_the_models_positions_is_refused_at_once(counted):
    model, calls = counted  # max_position_embeddings=1024
    pipe = pipeline(model, "fastkv", **TINY_FASTKV)
    for wanted in (1025, 10**7, 10**9):
        start = time.perf_counter()
        with pytest.raises(
            ConfigError, match=rf"max_new_tokens: must be at most .* \(1024\) \(got {wanted}\)"
        ):
            pipe([PROMPT], max_new_tokens=wanted)
        assert time.perf_counter() - start < 1.0
    assert calls == []


def test_max_new_tokens_beyond_free_memory_is_refused_before_allocating(counted):
    model, calls = counted
    model.config.max_position_embeddings = 10**12  # positions allow it: memory must refuse
    pipe = pipeline(model, "full")
    # 1 KiB of keys and values per token (4 layers x 2 heads x 16 dims x 2 x fp32): 10**11 tokens = 93 TiB
    with pytest.raises(ConfigError, match=r"max_new_tokens: the new tokens' cache must fit the free memory"):
        pipe([PROMPT], max_new_tokens=10**11)
    assert calls == []


def test_a_prompt_passing_the_models_positions_is_warned_about(caplog):
    model = tiny_model("llama")
    model.config.max_position_embeddings = 44
    pipe = pipeline(model, "full", max_new_tokens=6)
    with caplog.at_level(logging.WARNING, logger="kvpress_like"):
        pipe([PROMPT])  # 40 + 6 > 44
    assert "passes the model's max_position_embeddings (44)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvpress_like"):
        pipe([PROMPT], max_new_tokens=4)
    assert caplog.text == ""


def test_static_buffers_grow_with_the_tokens_generated(monkeypatch):
    """Buckets of 16 slots: a 40-token prompt asking for 100 tokens starts at 16 slots past the
    prompt and doubles as tokens come; the tokens are the eager loop's."""
    monkeypatch.setattr(decode, "BUCKET", 16)
    monkeypatch.setattr(decode, "NEW_SLOTS", 16)
    model = tiny_model("llama")
    pipe = pipeline(model, "full", max_new_tokens=100, stop_on_eos=False)
    eager = pipe([PROMPT], decode="eager").token_ids
    assert pipe([PROMPT], decode="static").token_ids == eager
    assert [key[1] for key in pipe._decoders.decoders] == [64, 128, 144]  # 40 + 16 -> x2 -> 40 + 100


def test_a_decode_that_stops_early_never_allocates_for_the_limit(monkeypatch):
    monkeypatch.setattr(decode, "BUCKET", 16)
    monkeypatch.setattr(decode, "NEW_SLOTS", 16)
    model = tiny_model("llama")
    pipe = pipeline(model, "full", max_new_tokens=3, stop_on_eos=False)
    third = pipe([PROMPT], decode="eager").token_ids[0][2]
    model.generation_config.eos_token_id = third  # the greedy run now ends at its third token
    out = pipe([PROMPT], decode="static", max_new_tokens=900, stop_on_eos=True)
    assert out.token_ids[0][-1] == third and len(out.token_ids[0]) <= 3
    assert [key[1] for key in pipe._decoders.decoders] == [64]  # not bucket(40 + 900)


def test_a_context_from_another_model_or_tokenizer_is_refused():
    first = pipeline(tiny_model("llama"), "full", tokenizer=CharTokenizer(), max_new_tokens=2)
    context = first.compress("some long enough text to compress")
    other_model = pipeline(tiny_model("qwen3"), "full", tokenizer=CharTokenizer())
    with pytest.raises(ConfigError, match=r"context: must come from this pipeline's model .*model is 'llama"):
        other_model.generate(context=context)

    class OtherTokenizer(CharTokenizer):
        pass

    other_tokenizer = pipeline(first.model, "full", tokenizer=OtherTokenizer())
    with pytest.raises(ConfigError, match=r"tokenizer is 'CharTokenizer"):
        other_tokenizer.generate(" more", context=context)
    with pytest.raises(ConfigError, match=r"context: must be a Context .* \(got dict\)"):
        first.generate(context={"cache": None})
    with pytest.raises(ConfigError, match=r"one row per context row \(1\) \(got 2\)"):
        first.generate([" a", " b"], context=context)
    assert first.generate(" more", context=context).token_ids  # its own pipeline takes it


@pytest.mark.parametrize("tokenizer", ["gpt2", 3, object()])
def test_something_that_is_no_tokenizer_is_refused_when_the_pipeline_is_built(tokenizer):
    with pytest.raises(
        ConfigError, match=r"tokenizer: must be a tokenizer object \(callable, with decode\(\)\)"
    ):
        pipeline(tiny_model("llama"), "full", tokenizer=tokenizer)


def test_a_pad_id_past_the_vocabulary_pads_with_one_inside_it():
    """A tokenizer's added pad token the embeddings were not resized for: padding (masked) takes
    the next id the model names, and each row of a padded batch answers as model.generate does."""

    class AddedPad(CharTokenizer):
        pad_token_id = 300

    model = tiny_model("llama")
    model.generation_config.eos_token_id = None  # four tokens from both
    rows = random_rows([6, 9], seed=4)
    expected = [
        model.generate(torch.tensor([row]), max_new_tokens=4, do_sample=False)[0, len(row) :] for row in rows
    ]
    got = pipeline(model, "full", tokenizer=AddedPad(), max_new_tokens=4)(rows).token_ids
    assert got == [row.tolist() for row in expected]


@pytest.mark.parametrize("model", [None, 3, "/nonexistent/model", torch.nn.Linear(2, 2)])
def test_something_that_is_no_model_is_refused(model):
    with pytest.raises(ConfigError, match="model"):
        pipeline(model, "fastkv")


def test_the_streamingllm_budget_message_reads_right():
    pipe = pipeline(tiny_model("llama"), "streamingllm", retain_rate=0.1, window=8, sink_tokens=4)
    with pytest.raises(ConfigError) as caught:
        pipe([random_rows([90])[0]])
    message = str(caught.value)
    assert "keeps 9 tokens, fewer than sink_tokens + window = 4 + 8 = 12" in message
