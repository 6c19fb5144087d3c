"""Plugin output contracts: every hook answer is checked where it is received, and a broken one
(or a plugin that raises) is a PluginError naming the plugin, its distribution and the hook."""

from __future__ import annotations

import traceback

import pytest
import torch

from kvpress_like import hookimpl, pipeline
from kvpress_like.errors import ConfigError, PluginError

from conftest import TINY_FASTKV, random_rows, tiny_model

PROMPT = random_rows([40], seed=11)[0]


class Answers:
    """A plugin answering one hook (on top of fastkv) with a fixed function of the layer."""

    def __init__(self, hook: str, answer) -> None:
        self.hook, self.answer = hook, answer

    @hookimpl(tryfirst=True)
    def score(self, layer):
        return self.answer(layer) if self.hook == "score" else None

    @hookimpl(tryfirst=True)
    def retain(self, layer, scores):
        return self.answer(layer) if self.hook == "retain" else None

    @hookimpl(tryfirst=True)
    def propagate(self, layer, scores):
        return self.answer(layer) if self.hook == "propagate" and layer.layer_idx == 1 else None

    @hookimpl(tryfirst=True)
    def restart(self, layer):
        return self.answer(layer) if self.hook == "restart" else None


def _shape(layer, kind):
    batch, heads, seq, _ = layer.keys.shape
    return (batch, heads, seq) if kind == "bhs" else (batch, seq)


BROKEN = {
    # [B, S] scores for a batch of as many rows as KV heads: accepted before, wrong rows silently
    "scores [B, S]": ("score", lambda layer: torch.rand(_shape(layer, "bs")), "float [B, Hkv, S]"),
    "bool scores": ("score", lambda layer: torch.ones(_shape(layer, "bhs"), dtype=torch.bool), "float"),
    "NaN scores": ("score", lambda layer: torch.full(_shape(layer, "bhs"), float("nan")), "finite"),
    "inf scores": ("score", lambda layer: torch.full(_shape(layer, "bhs"), float("inf")), "finite"),
    "list scores": ("score", lambda layer: [1.0, 2.0], "float [B, Hkv, S]"),
    "float mask": ("retain", lambda layer: torch.ones(_shape(layer, "bhs")), "bool [B, Hkv, S]"),
    "index retain": ("retain", lambda layer: torch.arange(4), "indices are not accepted"),
    "broadcast mask": (
        "retain",
        lambda layer: torch.ones((*_shape(layer, "bhs")[:1], 1, layer.keys.shape[2]), dtype=torch.bool),
        "bool [B, Hkv, S]",
    ),
    "keeps nothing": (
        "retain",
        lambda layer: torch.zeros(_shape(layer, "bhs"), dtype=torch.bool),
        "at least",
    ),
    "fewer than the window": (
        "retain",
        lambda layer: (
            torch.arange(layer.keys.shape[2]).expand(_shape(layer, "bhs")) >= layer.keys.shape[2] - 2
        ),
        "at least min(window=4",
    ),
    "propagates nothing": (
        "propagate",
        lambda layer: torch.zeros(_shape(layer, "bs"), dtype=torch.bool),
        "at least",
    ),
    "index propagate": ("propagate", lambda layer: torch.tensor([[0, 5, 9]]), "indices are not accepted"),
    "restart string": ("restart", lambda layer: "yes", "a bool or None"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_answer_names_the_plugin_the_hook_and_what_was_expected(case):
    hook, answer, expected = BROKEN[case]
    model = tiny_model("llama")  # 2 KV heads
    plugins = [Answers(hook, answer)]
    if hook == "restart":
        plugins.append(Answers("propagate", lambda layer: layer.valid.clone()))
    pipe = pipeline(model, "fastkv", plugins=plugins, max_new_tokens=2, **TINY_FASTKV)
    rows = [PROMPT, PROMPT[:30]]  # batch 2 == KV heads 2: a [B, S] answer has a [Hkv, S] shape
    with pytest.raises(PluginError) as caught:
        pipe(rows)
    message = str(caught.value)
    assert f"hook {hook}" in message and "'Answers' (test_contracts" in message
    assert expected in message


def test_valid_answers_are_used_as_given():
    """A valid retain mask keeps exactly its entries: checked against the mask itself."""

    def last_half(layer):
        seq = layer.keys.shape[2]
        keep = torch.arange(seq) >= seq // 2
        return (keep & layer.valid)[:, None].expand(_shape(layer, "bhs")).clone()

    model = tiny_model("llama")
    pipe = pipeline(model, "full", plugins=[Answers("retain", last_half)], max_new_tokens=2)
    out = pipe([PROMPT])
    assert out.stats.kv_kept_per_layer == [[40 - 20]] * 4


def test_an_exception_in_a_plugin_is_chained_with_the_plugin_named_and_its_traceback_kept():
    def explode(layer):
        return 1 / 0

    pipe = pipeline(tiny_model("llama"), "fastkv", plugins=[Answers("score", explode)], **TINY_FASTKV)
    with pytest.raises(
        PluginError, match=r"'Answers' .* raised in hook score at layer 0: ZeroDivisionError"
    ) as e:
        pipe([PROMPT])
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    frames = [frame.name for frame in traceback.extract_tb(e.value.__traceback__)]
    assert "explode" in frames  # the plugin's own frame is still there


def test_a_plugin_from_an_installed_distribution_is_named_with_it():
    """The keynorm plugin is its own distribution (plugins/keynorm): its errors say so."""
    from kvpress_like.plugins import load_strategy_class

    keynorm = load_strategy_class("keynorm")

    class Broken(keynorm):
        pass

    Broken.__module__ = keynorm.__module__  # as if shipped inside that distribution
    from kvpress_like.contracts import describe_plugin

    assert "from kvpress-like-keynorm" in describe_plugin(Broken)


def test_wrappers_observe_and_may_replace_an_answer_which_is_then_checked_as_theirs():
    seen = []

    class Observer:
        @hookimpl(wrapper=True)
        def retain(self, layer, scores):
            answer = yield
            seen.append(answer.sum().item())
            return answer

    class Spoiler:
        @hookimpl(wrapper=True)
        def retain(self, layer, scores):
            yield
            return torch.zeros_like(layer.keys[..., 0], dtype=torch.bool)  # keeps nothing

    model = tiny_model("llama")
    plain = pipeline(model, "fastkv", max_new_tokens=2, **TINY_FASTKV)([PROMPT])
    observed = pipeline(model, "fastkv", plugins=[Observer()], max_new_tokens=2, **TINY_FASTKV)([PROMPT])
    assert observed.token_ids == plain.token_ids and len(seen) == 4
    with pytest.raises(PluginError, match=r"'Spoiler' .* broke hook retain at layer 0"):
        pipeline(model, "fastkv", plugins=[Spoiler()], **TINY_FASTKV)([PROMPT])


def test_old_style_hookwrappers_are_refused_when_the_pipeline_is_built():
    class Legacy:
        @hookimpl(hookwrapper=True)
        def score(self, layer):
            yield

    with pytest.raises(ConfigError, match="old-style hookwrapper=True"):
        pipeline(tiny_model("llama"), "fastkv", plugins=[Legacy()], **TINY_FASTKV)


@pytest.mark.parametrize(
    "strategy", ["fastkv", "snapkv", "streamingllm", "h2o", "gemfilter", "pyramidkv", "adakv"]
)
def test_every_built_in_strategy_meets_the_contracts(strategy):
    settings = {"window": 4, "retain_rate": 0.25}
    if strategy == "fastkv":
        settings = TINY_FASTKV
    model = tiny_model("gemma3")
    out = pipeline(model, strategy, max_new_tokens=3, **settings)([PROMPT, PROMPT[:33]])
    assert len(out.token_ids) == 2


def test_an_answer_on_another_device_is_refused():
    on_meta = Answers("score", lambda layer: torch.empty(_shape(layer, "bhs"), device="meta"))
    with pytest.raises(
        PluginError, match=r"broke hook score at layer 0: expected a tensor on the layer's device"
    ):
        pipeline(tiny_model("llama"), "fastkv", plugins=[on_meta], **TINY_FASTKV)([PROMPT])


def test_a_plugin_registered_after_the_pipeline_was_built_takes_part():
    def explode(layer):
        raise KeyError("late")

    pipe = pipeline(tiny_model("llama"), "fastkv", max_new_tokens=2, **TINY_FASTKV)
    pipe([PROMPT])
    pipe.plugin_manager.register(Answers("score", explode))
    with pytest.raises(PluginError, match="raised in hook score"):
        pipe([PROMPT])
