"""The one place that knows how Hugging Face model families differ.

kvpress_like owns the layer loop (embed, decoder layers, norm, head) and calls transformers'
own decoder layers with its own positions. Attention goes to a function registered under
``kvpress_like`` in transformers' ``AttentionInterface``: it receives post-RoPE queries and
un-repeated keys, so the families' q/k norms, fused projections and partial rotary all stay inside
transformers' code.

The model itself is never touched, not even for the length of a call (another thread may be
running ``model.generate`` on it): the adapter drives *twins* of the decoder layers, module objects
of the same classes sharing the model's parameters and buffers, whose attention modules read a
private copy of the config naming the routed attention, and whose MLPs run over token slices.
Nothing is patched globally.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel

from kvpress_like.decode_projections import kernel_forward, kernel_groups
from kvpress_like.errors import ConfigError, UnsupportedModelError
from kvpress_like.parallel import TensorParallel
from kvpress_like.plugins import ModelInfo
from kvpress_like.rotary import RotaryEmbedding

ATTENTION_NAME = "kvpress_like"
STATE_KWARG = "kvpress_state"

# Families whose decoder stack this adapter drives and the tests cover (config.model_type).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")


class AttentionRouter(Protocol):
    """What the routed attention hands each call to (the pipeline's per-forward state)."""

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


def _routed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; shapes ``[B, H, T, D]`` in, ``[B, T, Hq, D]`` out."""
    router: AttentionRouter | None = kwargs.get(STATE_KWARG)
    if router is None:
        raise RuntimeError("kvpress_like attention was called outside a kvpress_like pipeline call")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    route = _route
    if isinstance(router, _EagerRouter):
        route, router = _route_eagerly, router.router
    out = route(router, module, query, key, value, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _route(router: AttentionRouter, module: nn.Module, *args: Any) -> torch.Tensor:
    return router.attend(module.layer_idx, *args)


# Under compiled prefill the graph breaks here: routing, the strategy's hooks and their host-side
# decisions stay eager, and the layer index is read outside the graph (a constant inside it would
# make every layer compile its own copy).
_route_eagerly = torch.compiler.disable(_route)


class _EagerRouter:
    """Marks a router whose attention calls must stay out of torch.compile's graph."""

    def __init__(self, router: AttentionRouter) -> None:
        self.router = router


AttentionInterface.register(ATTENTION_NAME, _routed_attention)


# The MLP is per token; at 128K tokens its intermediates ([T, intermediate] three times) would be
# the largest tensors of prefill, so it runs over slices of this many tokens.
MLP_CHUNK = 16384


def _chunked(forward):
    # Eager even under compiled prefill: a loop whose trip count follows the length would
    # compile once per prompt length.
    @torch.compiler.disable
    def sliced(hidden: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[1], MLP_CHUNK):
            out[:, start : start + MLP_CHUNK] = forward(hidden[:, start : start + MLP_CHUNK])
        return out

    def chunked_forward(hidden: torch.Tensor) -> torch.Tensor:
        return forward(hidden) if hidden.shape[1] <= MLP_CHUNK else sliced(hidden)

    return chunked_forward


def _twin(module: nn.Module, **attributes: Any) -> nn.Module:
    """Another module object of the same class over the same parameters, buffers and hooks, with
    ``attributes`` (children or plain attributes) replaced in the twin only."""
    twin = object.__new__(type(module))
    vars(twin).update(vars(module))
    children = {k: v for k, v in attributes.items() if isinstance(v, nn.Module)}
    vars(twin)["_modules"] = {**module._modules, **children}  # a new dict: the model's stays as it is
    vars(twin).update({k: v for k, v in attributes.items() if k not in children})
    return twin


def _routed_config(config: Any) -> Any:
    """A private copy of an attention module's config that names the routed attention."""
    routed = copy.deepcopy(config)
    routed._attn_implementation = ATTENTION_NAME
    return routed


# Linear children (by attribute name) that read one input, where a family has them apart: a
# decode step computes each group in one launch (decode_projections.py).
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _kernel_children(module: nn.Module) -> dict[str, nn.Module]:
    """Twins of ``module``'s linear children whose forwards run kernels/matvec.py."""
    twins = {}
    for name, group in kernel_groups(module, PROJECTION_GROUPS).items():
        twins[name] = _twin(getattr(module, name), kernel_group=group, kernel_name=name)
        vars(twins[name])["forward"] = types.MethodType(kernel_forward, twins[name])
    return twins


def _layer_twin(layer: nn.Module, configs: dict[int, Any], kernels: bool = False) -> nn.Module:
    """A decoder layer whose attention is routed to kvpress_like and whose MLP runs in slices, or
    (``kernels``) whose projections run kernels/matvec.py, for decode steps on a GPU."""
    attn, mlp = layer.self_attn, layer.mlp
    if id(attn.config) not in configs:
        configs[id(attn.config)] = _routed_config(attn.config)
    if kernels:
        attn_twin = _twin(attn, config=configs[id(attn.config)], **_kernel_children(attn))
        return _twin(layer, self_attn=attn_twin, mlp=_twin(mlp, **_kernel_children(mlp)))
    mlp_twin = _twin(mlp)
    vars(mlp_twin)["forward"] = _chunked(type(mlp).forward.__get__(mlp_twin))
    return _twin(layer, self_attn=_twin(attn, config=configs[id(attn.config)]), mlp=mlp_twin)


def _call_layer(
    layer: nn.Module, hidden: torch.Tensor, rotary: tuple, positions: torch.Tensor, router: AttentionRouter
) -> torch.Tensor:
    out = layer(
        hidden,
        attention_mask=None,
        position_ids=positions,
        position_embeddings=rotary,
        **{STATE_KWARG: router},
    )
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def _compiled_call_layer():
    # One compiled function for every layer, model and prompt length: parameters are graph inputs
    # and the token axis is dynamic, so a new length or another layer reuses the graphs.
    return torch.compile(_call_layer, dynamic=True)


class ModelAdapter:
    """Drives one loaded causal LM layer by layer."""

    def __init__(self, model: PreTrainedModel) -> None:
        if not isinstance(model, nn.Module) or not isinstance(
            getattr(model, "config", None), PretrainedConfig
        ):
            raise ConfigError(
                "model: must be a loaded transformers causal LM (a PreTrainedModel), a name or a path "
                f"(got {type(model).__name__})"
            )
        config = model.config
        model_type = getattr(config, "model_type", None)
        name = type(model).__name__
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model: architecture must be one of {list(SUPPORTED_MODEL_TYPES)} "
                f"(got {name} with model_type={model_type!r})"
            )
        base = getattr(model, "model", None)
        for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(base, part):
                raise UnsupportedModelError(f"model: {name} must have model.model.{part} (it does not)")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError(
                f"model: attention logit soft-capping is not supported (got {name} with "
                f"attn_logit_softcapping={config.attn_logit_softcapping})"
            )
        self.model = model
        self.base = base
        self.config = config
        # Twins of the decoder layers, built once: a compiled decode step guards on their identity.
        routed_configs: dict[int, Any] = {}
        decoder_layers = list(base.layers)[: config.num_hidden_layers]
        self.layers = [_layer_twin(layer, routed_configs) for layer in decoder_layers]
        # Sharded over ranks (parallel.py): the heads this rank computes and caches.
        self.parallel = TensorParallel.of(model)
        # Decode steps: the projections in kernels/matvec.py (decode_projections.py).
        self.kernel_layers = [_layer_twin(layer, routed_configs, kernels=True) for layer in decoder_layers]
        if getattr(config, "layer_types", None):
            self.layer_types = tuple(config.layer_types[: len(self.layers)])
        else:
            sliding = getattr(config, "sliding_window", None) is not None
            self.layer_types = ("sliding_attention" if sliding else "full_attention",) * len(self.layers)
        self.rotary_embedding = RotaryEmbedding(base.rotary_emb)
        self.head_dim = self.layers[0].self_attn.head_dim
        self.local_kv_heads = config.num_key_value_heads // self.parallel.size
        self.info = ModelInfo(
            num_layers=len(self.layers),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            layer_types=self.layer_types,
        )

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    def cache_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take over all layers (a full, uncompressed entry), on
        this rank."""
        info = self.info
        return 2 * info.num_layers * self.local_kv_heads * self.head_dim * self.dtype.itemsize

    def free_memory(self) -> int | None:
        """Bytes that can still be allocated on the model's device (CUDA: free plus cached by
        torch; CPU: the kernel's MemAvailable), or None where that cannot be read."""
        device = self.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer_type: str) -> tuple:
        """(cos, sin) for true ``positions`` ``[B, T]``, per layer type where the family has several."""
        return self.rotary_embedding(hidden, positions, layer_type)

    def run_layer(
        self,
        idx: int,
        hidden: torch.Tensor,
        rotary: tuple,
        positions: torch.Tensor,
        router: AttentionRouter,
        compiled: bool = False,
        kernels: bool = False,
    ) -> torch.Tensor:
        """One decoder layer on ``hidden`` ``[B, T, H]``; attention goes to ``router``. ``compiled``
        runs the layer's own work through torch.compile, the router's ``attend`` staying eager;
        ``kernels`` (``hidden`` of one token per row) runs its projections in kernels/matvec.py."""
        if compiled and kernels:
            raise ValueError("run_layer: kernels is a decode step's path, not compiled prefill's")
        if compiled:
            return _compiled_call_layer()(self.layers[idx], hidden, rotary, positions, _EagerRouter(router))
        layer = self.kernel_layers[idx] if kernels else self.layers[idx]
        return _call_layer(layer, hidden, rotary, positions, router)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits ``[B, V]`` for final-position hidden states ``[B, H]``."""
        logits = self.model.get_output_embeddings()(self.base.norm(hidden)).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
