"""Invalid input gets a clear error (field, rule, value) before any model work; config files load."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvpress_like import ConfigError, Pipeline, UnsupportedModelError, hookimpl, load_config, pipeline

from conftest import CharTokenizer, tiny_model

PROMPT = list(range(3, 43))  # 40 tokens


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def forward_calls(model):
    """Counts embedding calls: zero means no model work happened."""
    calls = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"tsp_rate": 0.0}, ["fastkv.tsp_rate", "greater than 0", "0.0"]),
        ({"tsp_rate": 1.5}, ["fastkv.tsp_rate", "less than or equal to 1", "1.5"]),
        ({"retain_rate": -0.1}, ["fastkv.retain_rate", "greater than 0", "-0.1"]),
        ({"tsp_layer": 7}, ["fastkv.tsp_layer", "4 layers", "7"]),
        ({"kernel": 4}, ["kernel: must be odd", "4"]),
        ({"pooling": "median"}, ["fastkv.pooling", "'max' or 'avg'", "median"]),
        (
            {"budget_mode": "constant", "tsp_tokens": 64, "retain_tokens": 4},
            ["retain_tokens must be >= window (8)", "4"],
        ),
        ({"budget_mode": "constant", "tsp_tokens": 64}, ["retain_tokens is required"]),
        ({"tsp_rat": 0.2}, ["fastkv.tsp_rat", "Extra inputs are not permitted"]),
        ({"max_new_tokens": 0}, ["generation.max_new_tokens", "greater than or equal to 1", "0"]),
        ({"top_p": 1.5}, ["generation.top_p", "1.5"]),
        ({"tsp_layer": True}, ["fastkv.tsp_layer", "must not be a bool", "True"]),
        ({"max_new_tokens": True}, ["generation.max_new_tokens", "must not be a bool", "True"]),
        ({"max_new_tokens": "many"}, ["generation.max_new_tokens", "valid integer", "many"]),
        ({"seed": False}, ["engine.seed", "must not be a bool", "False"]),
        (
            {"generation": {"max_new_tokens": 3}},
            ["generation: must be transformers' GenerationConfig", "dict"],
        ),
        ({"engine": {"decode": "eager"}}, ["engine: must be kvpress_like's EngineConfig", "'eager'"]),
        ({"plugins": 5}, ["plugins: must be a list of plugin objects", "5"]),
        (
            {"plugins": [object()]},
            ["plugins[0]: must implement at least one of kvpress_like's hooks", "object"],
        ),
    ],
)
def test_bad_settings_name_field_rule_and_value(model, settings, expected):
    with pytest.raises(ConfigError) as err:
        pipeline(model, "fastkv", **settings)
    for fragment in expected:
        assert fragment in str(err.value)


def test_settings_are_read_as_their_types_and_a_plugin_is_given_once(model):
    """A number in a string is read as the number (pydantic's lax mode, as a config file's values
    are); a flag stays a flag; one plugin object twice would run its hooks twice."""
    pipe = pipeline(model, "fastkv", max_new_tokens="5", temperature="0.5", do_sample=True)
    assert (pipe.generation.max_new_tokens, pipe.generation.temperature) == (5, 0.5)
    assert pipe.generation.do_sample is True

    class Scores:
        @hookimpl
        def score(self, layer):
            return None

    once = Scores()
    pipeline(model, "fastkv", plugins=[once])
    with pytest.raises(ConfigError, match=r"plugins\[1\]: must be given once"):
        pipeline(model, "fastkv", plugins=[once, once])
    with pytest.raises(ConfigError, match=r"plugins\[0\]: must be an instance, not a class"):
        pipeline(model, "fastkv", plugins=[Scores])

    class Misspelled:
        @hookimpl
        def scores(self, layer):
            return None

    with pytest.raises(ConfigError, match=r"plugins\[0\]: unknown hook 'scores'"):
        pipeline(model, "fastkv", plugins=[Misspelled()])


def test_settings_are_checked_before_a_model_is_loaded():
    with pytest.raises(ConfigError, match=r"fastkv\.tsp_rate"):
        pipeline("/nonexistent/model/path", "fastkv", tsp_rate=2.0)


def test_unknown_strategy_lists_the_known_ones(model):
    with pytest.raises(ConfigError) as err:
        pipeline(model, "snapkv-typo")
    assert "snapkv-typo" in str(err.value)
    assert "'fastkv'" in str(err.value) and "'full'" in str(err.value)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*model_type='gpt2'"):
        pipeline(gpt2, "fastkv")


def test_window_larger_than_budget_fails_before_prefill(model, forward_calls):
    pipe = pipeline(model, "fastkv", window=8, retain_rate=0.1)  # 10% of 40 tokens = 4 < 8
    with pytest.raises(ConfigError) as err:
        pipe(PROMPT)
    assert (
        "fastkv.window" in str(err.value)
        and "keeps 4 tokens" in str(err.value)
        and "window=8" in str(err.value)
    )
    assert forward_calls == []


@pytest.mark.parametrize("prompts", ["", [""], ["fine", ""], [], [[]], torch.empty(1, 0, dtype=torch.long)])
def test_empty_prompt_fails_before_prefill(model, forward_calls, prompts):
    pipe = pipeline(model, "full", tokenizer=CharTokenizer())
    with pytest.raises(ConfigError, match="prompts"):
        pipe(prompts)
    assert forward_calls == []


def test_text_without_tokenizer_is_refused(model):
    with pytest.raises(ConfigError, match="tokenizer: required for text prompts"):
        pipeline(model, "full")("hello")


def test_yaml_and_toml_configs_load_and_keywords_override(tmp_path, model):
    (tmp_path / "fastkv.yaml").write_text(
        "strategy: fastkv\nsettings:\n  tsp_rate: 0.5\n  retain_rate: 0.5\n  window: 4\n"
        "generation:\n  max_new_tokens: 5\n  stop_on_eos: false\n"
    )
    (tmp_path / "fastkv.toml").write_text(
        'strategy = "fastkv"\n[settings]\ntsp_rate = 0.5\nretain_rate = 0.5\nwindow = 4\n'
        "[generation]\nmax_new_tokens = 5\nstop_on_eos = false\n"
    )
    from_yaml = Pipeline.from_config(tmp_path / "fastkv.yaml", model)
    from_toml = Pipeline.from_config(tmp_path / "fastkv.toml", model, max_new_tokens=3)
    assert from_yaml.strategy.config.tsp_rate == 0.5 and from_yaml.strategy.config.window == 4
    assert from_yaml.strategy.config == from_toml.strategy.config
    assert len(from_yaml(PROMPT).ids) == 5
    assert len(from_toml(PROMPT).ids) == 3  # the keyword beat the file
    assert from_yaml(PROMPT).stats.kv_kept_per_layer[0] == [20.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("strategy: fastkv\nsettings:\n  tsp_rate: 3\n", ["fastkv.tsp_rate", "3"]),
        ("strategy: fastkv\nbudget: 3\n", ["cfg.yaml.budget", "Extra inputs are not permitted"]),
        ("generation:\n  temperature: 0\n", ["cfg.yaml.generation.temperature", "greater than 0", "0"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
    ],
)
def test_bad_config_files_are_explained(tmp_path, model, text, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Pipeline.from_config(path, model)
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_or_unknown_config_files(tmp_path):
    with pytest.raises(ConfigError, match="must exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"suffix must be .yaml, .yml or .toml \(got '.json'\)"):
        load_config(tmp_path / "cfg.json")


def test_the_config_reference_in_docs_is_current():
    from pathlib import Path

    from kvpress_like.reference import config_reference

    docs = Path(__file__).parents[1] / "docs" / "config.md"
    assert docs.read_text() == config_reference(), "run: kvpress-like config-reference > docs/config.md"
