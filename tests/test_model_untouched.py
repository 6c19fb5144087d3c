"""After every call, also one that fails mid-prefill, the wrapped model is exactly as it was."""

from __future__ import annotations

import pytest
import torch

from kvpress_like import hookimpl, pipeline

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
