"""Tensor parallelism on torch.distributed: a model sharded over the ranks of a device mesh with
torch's tensor-parallel API, by the plan its transformers config declares (``base_model_tp_plan``,
the plan ``from_pretrained(tp_plan="auto")`` applies).

Attention and KV heads are split over the ranks (``q/k/v_proj`` column-wise, ``o_proj``
row-wise, so transformers' attention runs on each rank's heads and its output is all-reduced);
the MLP likewise; the output head's vocabulary too, as the model's own plan (``_tp_plan``)
declares, each rank computing its part of the logits and all of them gathered on every rank;
embedding and norms stay whole on every rank. Each rank's
cache holds its own KV heads, scored and retained there; what needs every head (the score summed
over heads that chooses the propagated tokens, AdaKV's budget over all heads) goes through
``TensorParallel``'s collectives, so every rank makes the same choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kvpress_like.errors import ConfigError, UnsupportedModelError

# transformers' plan styles and torch's; the norms' "replicated" style needs nothing at inference.
_STYLES = {"colwise": "ColwiseParallel", "rowwise": "RowwiseParallel", "replicated_with_grad_allreduce": None}


def tensor_parallel_plan(model: nn.Module) -> dict[str, Any]:
    """The model's ``base_model_tp_plan`` as torch ``ParallelStyle`` objects, one per module path
    of ``model.model`` (``layers.3.self_attn.q_proj``)."""
    from torch.distributed.tensor import parallel

    declared = getattr(model.config, "base_model_tp_plan", None) or {}
    if not declared:
        raise UnsupportedModelError(
            f"model: {type(model).__name__} declares no tensor-parallel plan (config.base_model_tp_plan)"
        )
    unknown = {style for style in declared.values() if style not in _STYLES}
    if unknown:
        raise UnsupportedModelError(
            f"model: tensor parallelism supports the plan styles {sorted(_STYLES)} (got "
            f"{type(model).__name__} with {sorted(unknown)}: its heads would not be split)"
        )
    names = [name for name, _ in model.model.named_modules()]
    plan = {}
    for pattern, style in declared.items():
        if _STYLES[style] is None:
            continue
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + "$")
        for name in filter(regex.match, names):
            plan[name] = getattr(parallel, _STYLES[style])()
    return plan


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` in place over a 1-D device ``mesh`` by its own plan; returns it. Heads
    must divide evenly over the ranks."""
    from torch.distributed.tensor.parallel import parallelize_module

    config, ranks = model.config, mesh.size()
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field)
        if heads % ranks:
            raise ConfigError(f"model: config.{field} must divide over {ranks} ranks (got {heads})")
    parallelize_module(model.model, mesh, tensor_parallel_plan(model))
    parallelize_module(model, mesh, output_head_plan(model, ranks))
    return model


def output_head_plan(model: nn.Module, ranks: int) -> dict[str, Any]:
    """The output head's style where the model's own plan gives it one (transformers' causal LMs:
    ``_tp_plan = {"lm_head": "colwise_gather_output"}``, as ``from_pretrained(tp_plan="auto")``
    applies it): the vocabulary split over the ranks, the logits gathered whole on every rank. A
    decode step then reads 1/ranks of the head (1 GB whole for Llama-3.1-8B) per rank. The head
    stays whole where it shares its weight with the input embedding (tied), which must stay whole,
    or where its vocabulary does not divide over the ranks."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel

    head, declared = model.get_output_embeddings(), getattr(model, "_tp_plan", None) or {}
    names = [name for name, style in declared.items() if style == "colwise_gather_output"]
    names = [name for name in names if head is not None and dict(model.named_modules()).get(name) is head]
    tied = head is not None and head.weight is getattr(model.get_input_embeddings(), "weight", None)
    if not names or tied or head.weight.shape[0] % ranks:
        return {}
    return {names[0]: ColwiseParallel(output_layouts=Replicate())}


def sharded_possible() -> bool:
    """Whether any parameter can be a DTensor: only under an initialised process group (checked
    first, so that an unsharded run needs no DTensor import of its own)."""
    return dist.is_available() and dist.is_initialized()


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, or the tensor itself."""
    if sharded_possible():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.to_local()
    return tensor


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a sharded model runs in (``size == 1``: not sharded)."""

    group: Any = None
    size: int = 1
    rank: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> TensorParallel:
        """Read from the model's parameters: DTensors name their mesh."""
        if not sharded_possible():
            return cls()
        from torch.distributed.tensor import DTensor

        for param in model.parameters():
            if isinstance(param, DTensor):
                mesh = param.device_mesh
                if mesh.ndim != 1:
                    raise ConfigError(f"model: must be sharded over a 1-D mesh (got {mesh.ndim}-D)")
                group = mesh.get_group()
                return cls(group, dist.get_world_size(group), dist.get_rank(group))
        return cls()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (every rank gets the same sum)."""
        if self.size > 1:
            tensor = tensor.contiguous()
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def symmetric_memory(self) -> bool:
        """Set up symmetric memory for this group, so that compiled code may all-reduce small
        tensors with the one-shot kernel (each rank loads its peers' buffers; no NVLink
        multicast); whether it could (CUDA ranks whose GPUs all reach each other)."""
        if self.size == 1 or not torch.cuda.is_available() or dist.get_backend(self.group) != "nccl":
            return False
        gpus = range(torch.cuda.device_count())  # a rank that sees fewer GPUs cannot tell: NCCL then
        if len(gpus) < self.size or not all(
            torch.cuda.can_device_access_peer(a, b) for a in gpus for b in gpus if a != b
        ):
            return False
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        enable_symm_mem_for_group(self.group.group_name)
        return True

    def agree(self, mask: torch.Tensor) -> bool:
        """Whether every rank holds the same bool ``mask`` (two all-reduces and one host sync)."""
        if self.size == 1:
            return True
        low, high = mask.to(torch.int8), mask.to(torch.int8)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(low, high))

    def gather_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-head values ``[B, H_local, ...]`` of every rank, in rank order: ``[B, H, ...]``."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def local_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's heads ``[B, H_local, ...]`` of ``[B, H, ...]``."""
        if self.size == 1:
            return tensor
        return tensor.chunk(self.size, dim=1)[self.rank]
