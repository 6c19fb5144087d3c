"""``prefill="compiled"``: transformers' per-token work compiled around eager attention and hooks.

Keep-everything settings must still reproduce ``model.generate``; compressing settings must keep
exactly the entries the eager prefill keeps; new prompt lengths must not recompile.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_like import pipeline

from conftest import COMMON, TINY_FASTKV, random_rows, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_compiled_prefill_keeping_everything_matches_generate(family):
    model = tiny_model(family)
    rows = random_rows([40, 29])
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width) >= width - torch.tensor([[len(r)] for r in rows])).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, -1]

    keep_all = dict(tsp_rate=1.0, retain_rate=1.0, window=4)
    pipe = pipeline(model, "fastkv", prefill="compiled", max_new_tokens=6, stop_on_eos=False, **keep_all)
    torch.testing.assert_close(pipe.compress(rows).last_logits, logits, rtol=1e-4, atol=1e-4)
    assert pipe(rows).token_ids == expected[:, width:].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_prefill_keeps_what_eager_prefill_keeps(family, monkeypatch):
    monkeypatch.setattr("kvpress_like.adapter.MLP_CHUNK", 32)  # the MLP's slicing loop runs compiled too
    model = tiny_model(family)
    rows = random_rows([90, 61, 75])
    eager = pipeline(model, "fastkv", max_new_tokens=5, stop_on_eos=False, **TINY_FASTKV)
    compiled = pipeline(
        model, "fastkv", prefill="compiled", max_new_tokens=5, stop_on_eos=False, **TINY_FASTKV
    )
    ours, theirs = compiled.compress(rows), eager.compress(rows)
    for mine, ref in zip(ours.cache.layers, theirs.cache.layers, strict=True):
        assert torch.equal(mine.valid, ref.valid)
        assert torch.equal(mine.positions[mine.valid], ref.positions[ref.valid])
    assert ours.stats.tokens_per_layer == theirs.stats.tokens_per_layer
    torch.testing.assert_close(ours.last_logits, theirs.last_logits, rtol=1e-4, atol=1e-4)
    assert compiled(rows).token_ids == eager(rows).token_ids
    # A question on the compressed context, compiled or not (a per-call setting).
    question = random_rows([7, 3, 12], seed=5)
    asked = eager.extend(theirs, question, prefill="compiled").last_logits
    torch.testing.assert_close(asked, eager.extend(theirs, question).last_logits, rtol=1e-4, atol=1e-4)


def test_new_prompt_lengths_and_layers_do_not_recompile(monkeypatch):
    """Twelve layers and prompts on both sides of the MLP slice size: one set of graphs serves all."""
    monkeypatch.setattr("kvpress_like.adapter.MLP_CHUNK", 64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_hidden_layers": 12}))
    model.config._attn_implementation = "sdpa"
    pipe = pipeline(model, "fastkv", prefill="compiled", **{**TINY_FASTKV, "tsp_layer": 5})
    # A high limit, so that recompiles would show as new graphs rather than a silent eager fallback.
    with torch._dynamo.config.patch(recompile_limit=64):
        pipe.compress(random_rows([120]))
        pipe.compress(random_rows([150]))  # the first new length may turn the token axis dynamic
        graphs = counters["stats"]["unique_graphs"]
        for length in (99, 200, 333, 40):
            pipe.compress(random_rows([length]))
    assert counters["stats"]["unique_graphs"] == graphs
