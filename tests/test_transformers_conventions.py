"""transformers' conventions: settings sorted to where they belong (a name two sides know is an
error), transformers' GenerationConfig honoured as ``model.generate`` honours it (the reference:
``model.generate`` itself, fp32, keep-everything settings), logits processors, stopping criteria,
streamers and per-step scores on the eager and static decode paths."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from pydantic import Field
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
    TextIteratorStreamer,
)

from kvpress_like import Pipeline, hookimpl, pipeline
from kvpress_like.budget import BudgetConfig, BudgetStrategy
from kvpress_like.errors import ConfigError
from kvpress_like.strategies.fastkv import FastKV

from conftest import TINY_FASTKV, char_tokenizer_fast, random_rows, tiny_model

PROMPT = random_rows([30], seed=21)[0]
PATHS = ["eager", "static"]


def _reference(model, rows: list[list[int]], config: GenerationConfig, **kwargs) -> list[list[int]]:
    """model.generate, one row at a time (no padding), cut as the pipeline cuts: at EOS."""
    out = []
    for row in rows:
        ids = torch.tensor([row])
        generated = model.generate(ids, generation_config=config, **kwargs)[0, len(row) :].tolist()
        eos = config.eos_token_id if config.eos_token_id is not None else model.generation_config.eos_token_id
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        out.append(generated)
    return out


class SeededConfig(BudgetConfig):
    """A plugin's settings with a field named like a sampling setting (docs/plugins.md's walkthrough)."""

    seed: int = Field(0, description="seed of the plugin's own random scores")


class SeededStrategy(BudgetStrategy):
    name = "seeded"
    Config = SeededConfig

    @hookimpl
    def score(self, layer):
        gen = torch.Generator().manual_seed(self.config.seed)
        return torch.rand(layer.keys.shape[:3], generator=gen)

    @hookimpl
    def retain(self, layer, scores):
        return self.keep_best(scores, layer)


def test_a_name_two_sides_know_is_refused_naming_both():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"seed: .*a setting of strategy 'seeded' and an engine setting"):
        pipeline(model, SeededStrategy, seed=3)
    with pytest.raises(ConfigError, match=r"fastkv.tsp_rat: Extra inputs are not permitted"):
        pipeline(model, "fastkv", tsp_rat=0.3)
    with pytest.raises(
        ConfigError, match=r"tsp_rate: a strategy setting is fixed when the pipeline is built"
    ):
        pipeline(model, "fastkv", **TINY_FASTKV)([PROMPT], tsp_rate=0.3)


def test_config_file_sections_are_never_merged(tmp_path):
    """``settings: {seed: 5}`` is the strategy's seed, ``generation: {seed: 7}`` the sampler's."""
    model = tiny_model("llama")
    path = tmp_path / "seeded.yaml"
    path.write_text("strategy: fastkv\nsettings:\n  window: 4\n  tsp_layer: 1\ngeneration:\n  seed: 7\n")
    pipe = Pipeline.from_config(path, model, max_new_tokens=4)
    assert pipe.engine.seed == 7 and pipe.generation.max_new_tokens == 4
    assert pipe.strategy.config.window == 4


def test_the_explicit_forms_build_the_same_pipeline_as_keywords():
    model = tiny_model("qwen3")
    keywords = pipeline(model, "fastkv", max_new_tokens=5, **TINY_FASTKV)
    explicit = pipeline(model, FastKV.Config(**TINY_FASTKV), generation=GenerationConfig(max_new_tokens=5))
    built = pipeline(model, FastKV(FastKV.Config(**TINY_FASTKV), keywords.adapter.info), max_new_tokens=5)
    assert explicit.strategy.config == keywords.strategy.config == built.strategy.config
    rows = random_rows([33, 40], seed=2)
    assert explicit(rows).token_ids == keywords(rows).token_ids == built(rows).token_ids
    with pytest.raises(ConfigError, match=r"tsp_rate: the strategy's settings come with the FastKVConfig"):
        pipeline(model, FastKV.Config(**TINY_FASTKV), tsp_rate=0.3)


GREEDY_CASES = {
    "repetition penalty": dict(repetition_penalty=1.8),
    "min new tokens": dict(min_new_tokens=7),
    "plain": {},
}


@pytest.mark.parametrize("decode", PATHS)
@pytest.mark.parametrize("case", sorted(GREEDY_CASES))
def test_generation_config_fields_change_greedy_outputs_as_in_generate(case, decode):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = PROMPT[3]  # a token the random model does emit at times
    config = GenerationConfig(max_new_tokens=8, do_sample=False, **GREEDY_CASES[case])
    rows = random_rows([20, 31], seed=5)
    got = pipeline(model, "full", generation=config, decode=decode)(rows).token_ids
    assert got == _reference(model, rows, config)


@pytest.mark.parametrize("decode", PATHS)
def test_the_repetition_penalty_leaves_out_padding_between_a_context_and_its_continuation(decode):
    """Rows compressed as a batch, continued by questions of different lengths: the shorter one is
    padded between its context and its continuation. With the pad id made the token the row says
    first, penalising the padding would change that row's answer."""
    model = tiny_model("llama")
    rows, cuts = random_rows([20, 31], seed=3), [15, 10]  # continuations of 5 and 21 tokens
    config = GenerationConfig(max_new_tokens=6, do_sample=False, repetition_penalty=3.0)
    expected = _reference(model, rows, config)
    model.generation_config.pad_token_id = expected[0][0]
    assert expected[0][0] not in rows[0]  # so the penalty would touch it only as padding
    pipe = pipeline(model, "full", generation=config, decode=decode, stop_on_eos=False)
    context = pipe.compress([row[:cut] for row, cut in zip(rows, cuts, strict=True)])
    got = pipe.generate([row[cut:] for row, cut in zip(rows, cuts, strict=True)], context=context)
    assert got.token_ids == expected


@pytest.mark.parametrize("given_to", ["pipeline", "call"])
def test_a_given_generation_config_keeps_the_models_own_end_of_sequence(given_to):
    """model.generate completes a GenerationConfig it is given from the model's own settings where
    it leaves one unset: here the end-of-sequence id, a token greedy decoding emits early."""
    model, ids = tiny_model("llama"), torch.tensor([PROMPT])
    config = GenerationConfig(max_new_tokens=10, do_sample=False)
    model.generation_config.eos_token_id = None
    free = model.generate(ids, generation_config=config)[0, len(PROMPT) :].tolist()
    stop_at = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    model.generation_config.eos_token_id = free[stop_at]
    expected = model.generate(ids, generation_config=config)[0, len(PROMPT) :].tolist()
    assert expected == free[: stop_at + 1]  # the reference stops there
    if given_to == "pipeline":
        got = pipeline(model, "full", generation=config)([PROMPT])
    else:
        got = pipeline(model, "full", max_new_tokens=3)([PROMPT], generation_config=config)
    assert got.token_ids == [expected]


@pytest.mark.parametrize("decode", PATHS)
def test_seeded_sampling_draws_what_generate_draws(decode):
    model = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    pipe = pipeline(model, "full", generation=config, decode=decode, seed=11, stop_on_eos=False)
    got = pipe([PROMPT]).token_ids[0]
    torch.manual_seed(11)  # generate draws from the global generator; the pipeline from its own
    expected = model.generate(torch.tensor([PROMPT]), generation_config=config, min_new_tokens=8)[0, 30:]
    assert got == expected.tolist()


def test_the_models_own_generation_config_is_the_default():
    model = tiny_model("llama")
    model.generation_config.repetition_penalty = 2.0
    model.generation_config.max_new_tokens = 6
    got = pipeline(model, "full")([PROMPT]).token_ids
    assert got == _reference(model, [PROMPT], model.generation_config)
    assert len(got[0]) <= 6


def test_unsupported_generation_settings_are_refused_not_ignored():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"generation.num_beams: Input should be less than or equal to 1"):
        pipeline(model, "full", num_beams=4)
    with pytest.raises(ConfigError, match=r"generation.no_repeat_ngram_size: is not supported"):
        pipeline(model, "full", no_repeat_ngram_size=2)
    with pytest.raises(ConfigError, match=r"generation.temperature: Input should be greater than 0"):
        pipeline(model, "full")([PROMPT], do_sample=True, temperature=-1.0)


@pytest.mark.parametrize("decode", PATHS)
def test_logits_processors_and_stopping_criteria_lists_as_in_generate(decode):
    model = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    banned = _reference(model, [PROMPT], config)[0][:2]  # what greedy would say first
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(banned)])
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=len(PROMPT) + 5)])
    pipe = pipeline(model, "full", generation=config, decode=decode)
    got = pipe([PROMPT], logits_processor=processors, stopping_criteria=criteria).token_ids
    expected = _reference(model, [PROMPT], config, logits_processor=processors, stopping_criteria=criteria)
    assert got == expected and len(got[0]) == 5 and not set(banned) & set(got[0])


@pytest.mark.parametrize("decode", PATHS)
def test_stop_strings_stop_where_generate_stops(decode):
    model, tok = tiny_model("llama"), char_tokenizer_fast()
    text = tok.decode(_reference(model, [PROMPT], GenerationConfig(max_new_tokens=10))[0])
    stop = text[4:6]  # stops at the first place these two characters are generated
    config = GenerationConfig(max_new_tokens=10, stop_strings=[stop])
    got = pipeline(model, "full", tokenizer=tok, generation=config, decode=decode)([PROMPT])
    assert got.token_ids == _reference(model, [PROMPT], config, tokenizer=tok)
    assert got.texts[0].endswith(stop) and len(got.token_ids[0]) < 10


@pytest.mark.parametrize("decode", PATHS)
def test_a_streamer_and_a_callback_receive_exactly_the_generated_tokens(decode):
    model, tok = tiny_model("llama"), char_tokenizer_fast()
    pipe = pipeline(model, "fastkv", tokenizer=tok, max_new_tokens=9, decode=decode, **TINY_FASTKV)
    prompt = "".join(chr(t) for t in PROMPT if t >= 32 and t < 127) * 2
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    seen: list[list[int | None]] = []
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            out=pipe(prompt, streamer=streamer, on_token=seen.append, chat_template=False)
        )
    )
    worker.start()
    streamed = "".join(streamer)  # consumed while the call runs, as a server would
    worker.join()
    out = result["out"]
    assert streamed == tok.decode(out.token_ids[0])
    assert [step[0] for step in seen] == out.token_ids[0]
    with pytest.raises(ConfigError, match=r"streamer: takes one row"):
        pipe([prompt, prompt], streamer=TextIteratorStreamer(tok))


@pytest.mark.parametrize("decode", PATHS)
def test_output_scores_are_generates_scores(decode):
    model = tiny_model("llama")
    config = GenerationConfig(max_new_tokens=5, repetition_penalty=1.5)
    out = pipeline(model, "full", generation=config, decode=decode, stop_on_eos=False)(
        [PROMPT], output_scores=True
    )
    theirs = model.generate(
        torch.tensor([PROMPT]), generation_config=config, output_scores=True, return_dict_in_generate=True
    ).scores
    assert len(out.scores) == len(theirs) == 5
    for ours, reference in zip(out.scores, theirs, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_a_prefill_without_its_fused_chunk_kernel_says_so(caplog, monkeypatch):
    import importlib

    module = importlib.import_module("kvpress_like.pipeline")
    monkeypatch.setattr(module, "chunk_kernels_available", lambda adapter: False)
    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=2, prefill_chunk=16)
    with caplog.at_level(logging.INFO, logger="kvpress_like"):
        pipe([PROMPT])
    assert "prefill_chunk=16 not used" in caplog.text


def test_settings_the_decode_loop_cannot_honour_are_refused_before_prefill():
    model = tiny_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    pipe = pipeline(model, "full")
    try:
        with pytest.raises(ConfigError, match=r"generation.max_length: kvpress_like counts new tokens"):
            pipe([PROMPT], max_length=40)
        with pytest.raises(ConfigError, match=r"generation.stop_strings: need a tokenizer"):
            pipe([PROMPT], stop_strings=["ab"])
        with pytest.raises(ConfigError, match=r"generation.eos_token_id: must be in \[0, 256\)"):
            pipe([PROMPT], eos_token_id=10**6)
    finally:
        handle.remove()
    assert calls == []


def test_a_streamer_is_ended_when_a_call_fails_midway():
    model, tok = tiny_model("llama"), char_tokenizer_fast()

    class Explodes:
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > len(PROMPT) + 1:
                raise RuntimeError("processor failure")
            return scores

    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    with pytest.raises(RuntimeError, match="processor failure"):
        pipeline(model, "full", tokenizer=tok, max_new_tokens=5)(
            [PROMPT], streamer=streamer, logits_processor=[Explodes()]
        )
    assert isinstance("".join(streamer), str)  # ended: the reader returns instead of waiting
