"""After every call, also one that fails mid-prefill, the wrapped model is exactly as it was."""

from __future__ import annotations

import functools

import pytest
import torch

from kvpress_like import hookimpl, pipeline
from kvpress_like.errors import ConfigError

from conftest import tiny_model

PROMPT = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(5))


class FailAtLayer:
    """Raises from the score hook at one layer, i.e. in the middle of prefill."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx

    @hookimpl(tryfirst=True)
    def score(self, layer):
        if layer.layer_idx == self.layer_idx:
            raise RuntimeError("injected failure")


def _snapshot(model):
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    return {
        "attn": sorted((type(c).__name__, c._attn_implementation) for c in configs.values()),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "instance_attrs": sorted(name for m in model.modules() for name in vars(m) if name == "forward"),
        "training": [m.training for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "generate": model.generate(PROMPT, max_new_tokens=6, do_sample=False)[0].tolist(),
    }


def _assert_same(before, after):
    assert after["attn"] == before["attn"]
    assert after["hooks"] == before["hooks"]
    assert after["instance_attrs"] == before["instance_attrs"] == []
    assert after["training"] == before["training"]
    assert after["generate"] == before["generate"]
    assert after["state"].keys() == before["state"].keys()
    for key, tensor in before["state"].items():
        assert torch.equal(after["state"][key], tensor), key


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_model_is_unchanged_after_a_failure_mid_prefill(family):
    model = tiny_model(family)
    before = _snapshot(model)
    pipe = pipeline(model, "fastkv", plugins=[FailAtLayer(2)], window=4, retain_rate=0.5)
    with pytest.raises(RuntimeError, match="injected failure"):
        pipe(PROMPT)
    _assert_same(before, _snapshot(model))


def test_model_is_unchanged_after_successful_calls():
    model = tiny_model("qwen3")
    before = _snapshot(model)
    pipe = pipeline(model, "fastkv", window=4, retain_rate=0.3, max_new_tokens=4)
    pipe(PROMPT)
    context = pipe.compress(PROMPT)
    pipe.generate([5, 6, 7], context=context)
    _assert_same(before, _snapshot(model))


def _rope_rewriting_model(kind: str):
    """A tiny model whose RoPE module rewrites its frequencies in its forward past 32 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    from conftest import COMMON

    torch.manual_seed(0)
    if kind == "longrope":  # Phi-3-mini-128k's kind
        rope = {
            "rope_type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [8.0 + i for i in range(8)],
        }
        model = Phi3ForCausalLM(Phi3Config(**COMMON, original_max_position_embeddings=32, rope_scaling=rope))
    else:
        rope = {"rope_type": "dynamic", "factor": 4.0}
        model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "max_position_embeddings": 32}, rope_scaling=rope))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _rotary_state(model) -> dict:
    rotary = model.model.rotary_emb
    state = {name: value for name, value in vars(rotary).items() if not name.startswith("_")}
    return {**state, **{name: buffer.clone() for name, buffer in rotary.named_buffers()}}


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_a_rope_that_rewrites_its_frequencies_is_never_rewritten_on_the_model(kind, decode):
    """transformers' dynamic and longrope RoPE write their module's frequencies at every forward:
    the pipeline computes its own, so the model's stay as they were, and every call answers what
    model.generate answers on a fresh model: also after other calls (a long prompt, then a short
    one), and when the model had run a long prompt before the pipeline was built."""
    long_prompt, short_prompt = PROMPT.repeat(1, 2)[:, :70], PROMPT[:, :20]

    def fresh_generate(prompt):
        return _rope_rewriting_model(kind).generate(prompt, max_new_tokens=6, do_sample=False)[
            0, prompt.shape[1] :
        ]

    expected = [fresh_generate(long_prompt).tolist(), fresh_generate(short_prompt).tolist()]
    model = _rope_rewriting_model(kind)
    model.generate(long_prompt, max_new_tokens=6, do_sample=False)  # dynamic NTK's grows and stays
    rotary = model.model.rotary_emb
    rotary.forward = functools.partial(type(rotary).forward, rotary)  # bound as accelerate's hooks bind it
    before = _rotary_state(model)
    pipe = pipeline(model, "full", max_new_tokens=6, stop_on_eos=False, decode=decode)
    got = [pipe(long_prompt).token_ids[0], pipe(short_prompt).token_ids[0], pipe(long_prompt).token_ids[0]]
    assert got == [*expected, expected[0]]
    after = _rotary_state(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value) if isinstance(value, torch.Tensor) else after[name] == value, (
            name
        )


def test_a_compiled_decode_of_a_dynamic_rope_is_refused_before_any_work():
    pipe = pipeline(_rope_rewriting_model("dynamic"), "full", max_new_tokens=2, decode="compiled")
    prefills = []
    pipe._prefill = lambda *args: prefills.append(args)  # a call that got this far would prefill
    with pytest.raises(
        ConfigError, match=r"engine.decode: 'compiled' cannot trace this model's dynamic RoPE"
    ):
        pipe(PROMPT)
    assert prefills == []
