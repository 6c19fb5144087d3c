"""Decode layers on the projection kernels (decode_projections.py, kernels/matvec.py).

- The kernel twins of every family's decoder layers give what the plain layers give, eagerly and
  compiled with fullgraph, through a router whose output depends on q, k and v (a swapped group
  member changes it), and leave the model's own modules as they were. On a model sharded over two
  ranks, tests/tp_worker.py makes the same comparison (tests/test_tensor_parallel.py).

The kernel itself is tested in tests/test_decode_kernel.py (Triton's CPU interpreter) and
tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from kvpress_like.adapter import ModelAdapter

from conftest import FAMILIES, tiny_model


class MixingRouter:
    """One new key per row: every query head gets its KV head's value scaled by q.k, so the
    output reads all three projections."""

    def attend(self, layer_idx, query, key, value, scaling, sliding_window):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        return value * torch.tanh((query * key).sum(-1, keepdim=True) * scaling)


def run_all_layers(adapter: ModelAdapter, hidden: torch.Tensor, kernels: bool) -> torch.Tensor:
    positions = torch.tensor([[7]])
    router = MixingRouter()
    for idx, layer_type in enumerate(adapter.layer_types):
        rotary = adapter.rotary(hidden, positions, layer_type)
        hidden = adapter.run_layer(idx, hidden, rotary, positions, router, kernels=kernels)
    return hidden


def qkv_groups(adapter: ModelAdapter, layer: int = 0) -> int:
    """How many launches a kernel layer's q, k and v projections take (1: grouped)."""
    attn = adapter.kernel_layers[layer].self_attn
    return len({id(getattr(attn, name).kernel_group) for name in ("q_proj", "k_proj", "v_proj")})


def _steps(model, count: int = 2) -> list[torch.Tensor]:
    """Hidden states of ``count`` successive decode steps (each a new token)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 1, model.config.hidden_size, generator=generator) for _ in range(count)]


def _matches_plain(adapter: ModelAdapter, hiddens: list[torch.Tensor]) -> bool:
    with torch.no_grad():
        return all(
            torch.equal(run_all_layers(adapter, h, kernels=True), run_all_layers(adapter, h, kernels=False))
            for h in hiddens
        )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernel_layers_give_the_plain_layers_output_eagerly_and_compiled(family):
    """Step after step (a result left pending from the step before would show), eagerly and
    through one fullgraph compile whose second and third calls replay it."""
    model = tiny_model(family)
    own_forwards = {name: vars(module).get("forward") for name, module in model.named_modules()}
    adapter = ModelAdapter(model)
    hiddens = _steps(model, 3)
    assert _matches_plain(adapter, hiddens)
    torch._dynamo.reset()
    compiled = torch.compile(run_all_layers, fullgraph=True)
    with torch.no_grad():
        for hidden in hiddens:
            plain = run_all_layers(adapter, hidden, kernels=False)
            torch.testing.assert_close(compiled(adapter, hidden, True), plain, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    # q, k and v (gate and up) share one launch where the family has them apart.
    if family != "phi3":  # phi3's q, k and v are one linear already
        assert qkv_groups(adapter) == 1
    assert {name: vars(module).get("forward") for name, module in model.named_modules()} == own_forwards


def test_a_new_adapter_of_the_same_model_runs_the_compiled_layers_without_compiling_again():
    """Each pipeline builds its own adapter and twins: the compiled step must not be guarded on
    their identity, or every new pipeline on a model recompiles it (minutes on a GPU)."""
    model = tiny_model("llama")
    (hidden,) = _steps(model, 1)
    torch._dynamo.reset()
    compiled = torch.compile(run_all_layers, fullgraph=True)
    with torch.no_grad():
        compiled(ModelAdapter(model), hidden, True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(ModelAdapter(model), hidden, True)
    torch._dynamo.reset()


def test_a_group_member_whose_bias_differs_runs_alone():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj.bias = torch.nn.Parameter(torch.randn(attn.k_proj.out_features))
    adapter = ModelAdapter(model)
    assert qkv_groups(adapter) == 3
    assert _matches_plain(adapter, _steps(model))


def _double_input(module, args):
    return (2 * args[0],)


def test_pre_hooks_give_each_member_its_own_input_whenever_they_were_added():
    """A pre-hook that changes k's input: there before the adapter, k runs alone; added after,
    the group stops sharing a launch (and again, once it is removed); a global one too."""
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    before = attn.k_proj.register_forward_pre_hook(_double_input)
    adapter = ModelAdapter(model)
    assert qkv_groups(adapter) == 3
    assert _matches_plain(adapter, _steps(model))
    before.remove()
    adapter = ModelAdapter(model)
    assert qkv_groups(adapter) == 1
    for hooked in (attn.v_proj, model.model.layers[1].mlp.up_proj):
        after = hooked.register_forward_pre_hook(_double_input)
        assert _matches_plain(adapter, _steps(model))
        after.remove()
        assert _matches_plain(adapter, _steps(model))
    with torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None):
        assert _matches_plain(adapter, _steps(model))


def test_linears_with_a_forward_of_their_own_or_of_a_subclass_keep_it():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    vars(mlp.up_proj)["forward"] = lambda x: 3 * torch.nn.functional.linear(x, mlp.up_proj.weight)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 0.5 * super().forward(x)

    scaled = Scaled(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    scaled.weight = mlp.down_proj.weight
    mlp.down_proj = scaled
    adapter = ModelAdapter(model)
    twin = adapter.kernel_layers[0].mlp
    assert (
        "forward" not in vars(twin.down_proj)
        and vars(twin.up_proj)["forward"] is vars(mlp.up_proj)["forward"]
    )
    assert _matches_plain(adapter, _steps(model))
