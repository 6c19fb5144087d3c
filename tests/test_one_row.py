"""Batch-1 decode layers on the one-row kernel (one_row.py, kernels/matvec.py).

- The one-row twins of every family's decoder layers give what the plain layers give, eagerly and
  compiled with fullgraph, through a router whose output depends on q, k and v (a swapped group
  member changes it), and leave the model's own modules as they were.

The kernel itself is tested in tests/test_decode_kernel.py (Triton's CPU interpreter) and
tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from kvpress_like.adapter import ModelAdapter

from conftest import FAMILIES, tiny_model


class _MixingRouter:
    """One new key per row: every query head gets its KV head's value scaled by q.k, so the
    output reads all three projections."""

    def attend(self, layer_idx, query, key, value, scaling, sliding_window):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        return value * torch.tanh((query * key).sum(-1, keepdim=True) * scaling)


def _run_all(adapter: ModelAdapter, hidden: torch.Tensor, one_row: bool) -> torch.Tensor:
    positions = torch.tensor([[7]])
    router = _MixingRouter()
    for idx, layer_type in enumerate(adapter.layer_types):
        rotary = adapter.rotary(hidden, positions, layer_type)
        hidden = adapter.run_layer(idx, hidden, rotary, positions, router, one_row=one_row)
    return hidden


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_row_layers_give_the_plain_layers_output_eagerly_and_compiled(family):
    model = tiny_model(family)
    own_forwards = {name: vars(module).get("forward") for name, module in model.named_modules()}
    adapter = ModelAdapter(model)
    hidden = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = _run_all(adapter, hidden, one_row=False)
        assert torch.equal(_run_all(adapter, hidden, one_row=True), plain)
        torch._dynamo.reset()
        compiled = torch.compile(_run_all, fullgraph=True)
        for _ in range(2):  # the second call replays the compiled graph, the group state included
            torch.testing.assert_close(compiled(adapter, hidden, True), plain, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    # q, k and v (gate and up) share one launch where the family has them apart.
    attn = adapter.one_row_layers[0].self_attn
    if hasattr(attn, "k_proj"):
        assert vars(attn.q_proj)["forward"].func.__self__ is vars(attn.v_proj)["forward"].func.__self__
    assert {name: vars(module).get("forward") for name, module in model.named_modules()} == own_forwards


def test_a_group_member_whose_bias_differs_runs_alone():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj.bias = torch.nn.Parameter(torch.randn(attn.k_proj.out_features))
    adapter = ModelAdapter(model)
    twin = adapter.one_row_layers[0].self_attn
    groups = {id(vars(getattr(twin, n))["forward"].func.__self__) for n in ("q_proj", "k_proj", "v_proj")}
    assert len(groups) == 3
    hidden = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(_run_all(adapter, hidden, True), _run_all(adapter, hidden, False))
