"""Projections of decode steps on the fixed-tile kernels of kernels/matvec.py (one row: a batch-1
step; a few: a small batch; more rows run cuBLAS inside the same op).

``kernel_groups(module, groups)`` gives, for each ``nn.Linear`` child of an attention or MLP module
that the kernel can run, its launch group; ``kernel_forward`` is the forward the adapter puts on a
twin of the child. Linears that read one input (``groups``, named by the adapter: a layer's q, k
and v projections; gate and up) share one launch: a call whose result is pending takes it, any
other call computes the whole group afresh and leaves the other members' results pending.
transformers' attention and MLP forwards call the members on one ``hidden_states``, in a fixed
order, every step, so the first-called member recomputes the group each step and no result outlives
its step. A forward pre-hook may hand each member an input of its own, so a group forms only of
members without pre-hooks (beyond a sharded model's one, below), and once any is added (or a global
one), every member computes alone from the input it is given.

Left to their own forwards: subclasses of ``nn.Linear`` (PEFT, quantized layers), linears with a
forward of their own (accelerate's hooks), weights of a tensor subclass.

Sharded models (tensor parallelism, parallel.py) keep their plan: each linear's DTensor hooks still
turn its input into a DTensor and its output back. In between, the kernel runs on this rank's
shards, and the result becomes a DTensor placed as ``F.linear`` would place it: a column-parallel
weight (``Shard(0)``) gives the output's last axis sharded, a row-parallel one (``Shard(1)``) a
partial sum that the output hook all-reduces. A linear sharded otherwise, or row-parallel with a
bias (which must be added once, after the sum), keeps its own forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from kvpress_like.kernels import matvec
from kvpress_like.kernels.decode_attention import sm_count
from kvpress_like.kernels.matvec import matvec_op
from kvpress_like.parallel import local_shard, sharded_possible


class _Group:
    """Linears reading one input, computed in one launch when the first of them is called."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.pending: dict[str, torch.Tensor] = {}
        # Decided once (a model's sharding does not change): None for plain weights.
        weight = next(iter(linears.values())).weight
        self.placement = _output_placement(weight)
        self.pre_hooks = self._pre_hooks()
        # Zeroed counters for launches split over their columns (matvec.FEW_ROWS_SPLIT_K), left zero
        # by every launch; one per SM, as many blocks as a split launch may have. A pipeline's
        # static decodes take turns (decode.DecoderPool), so its steps never share them at once.
        device = local_shard(weight.data).device
        self.counters = None
        if device.type == "cuda" and matvec.FEW_ROWS_SPLIT_K > 1:
            self.counters = torch.zeros(sm_count(device), dtype=torch.int32, device=device)
            torch._dynamo.mark_static_address(self.counters)  # the step's CUDA graphs read it in place

    def _pre_hooks(self) -> list[int]:
        return [len(linear._forward_pre_hooks) for linear in self.linears.values()]

    def forward(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``linears[name](hidden)`` for ``hidden`` ``[..., K]`` (one token per row): ``[..., N_name]``."""
        if len(self.linears) > 1 and (
            module_hooks._global_forward_pre_hooks or self._pre_hooks() != self.pre_hooks
        ):
            self.pending = {}  # pre-hooks changed since the group formed: its own input, alone
            return self._compute({name: self.linears[name]}, hidden)[name]
        if name not in self.pending:
            self.pending = self._compute(self.linears, hidden)
        return self.pending.pop(name)

    def _compute(self, linears: dict[str, nn.Linear], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = [linear.weight for linear in linears.values()]
        first = next(iter(linears.values()))
        biases = [linear.bias for linear in linears.values()] if first.bias is not None else []
        if self.placement is None:
            outs = matvec_op(hidden, weights, biases, self.counters)
        else:  # this rank's shards through the kernel, the result placed as F.linear places it
            from torch.distributed.tensor import DTensor

            local = matvec_op(
                local_shard(hidden),
                [local_shard(w) for w in weights],
                [local_shard(b) for b in biases],
                self.counters,
            )
            mesh = weights[0].device_mesh
            outs = [DTensor.from_local(out, mesh, [self.placement], run_check=False) for out in local]
        return dict(zip(linears, outs, strict=True))


def _output_placement(weight: torch.Tensor):
    """A sharded weight's product's placement (``Shard(-1)`` or ``Partial()``); None for a plain
    tensor; ``False`` where the kernel cannot serve the sharding (see the module docstring)."""
    if not sharded_possible():
        return None
    from torch.distributed.tensor import DTensor, Partial, Shard

    if not isinstance(weight, DTensor):
        return None
    if weight.device_mesh.ndim != 1 or not isinstance(weight.placements[0], Shard):
        return False
    return Shard(-1) if weight.placements[0].dim == 0 else Partial()


def _servable(linear: nn.Module) -> bool:
    """Whether the kernel can run ``linear`` in its place (see the module docstring)."""
    if type(linear) is not nn.Linear or "forward" in vars(linear):
        return False
    placement = _output_placement(linear.weight)
    if type(local_shard(linear.weight.data)) is not torch.Tensor or placement is False:
        return False
    return placement is None or linear.bias is None or placement.is_shard()


def _groupable(members: dict[str, nn.Linear]) -> bool:
    """One launch takes all biases or none, gives every result one placement, and reads one input:
    no pre-hooks, or only a sharded model's one per linear."""
    linears = list(members.values())
    placement = _output_placement(linears[0].weight)
    allowed_hooks = 0 if placement is None else 1
    return (
        len({linear.bias is not None for linear in linears}) == 1
        and len({str(_output_placement(linear.weight)) for linear in linears}) == 1
        and all(len(linear._forward_pre_hooks) == allowed_hooks for linear in linears)
    )


def kernel_groups(module: nn.Module, groups: Sequence[Sequence[str]]) -> dict[str, _Group]:
    """The launch group of each of ``module``'s linear children the kernel can run, by attribute
    name; those named together in ``groups`` share one where they can."""
    linears = {name: child for name, child in module.named_children() if _servable(child)}
    launches = []
    for names in groups:
        members = {name: linears[name] for name in names if name in linears}
        if len(members) == len(names) and _groupable(members):
            launches.append(members)
    grouped = {name for members in launches for name in members}
    launches += [{name: linear} for name, linear in linears.items() if name not in grouped]
    return {name: group for group in map(_Group, launches) for name in group.linears}


def kernel_forward(linear: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The forward of a linear's twin carrying ``kernel_group`` and ``kernel_name``: its result from
    the group. Bound to the twin as a method, not made a ``functools.partial``: a compiled step
    guards a partial by its identity, so every new adapter of the same model (a new pipeline)
    would recompile it, and a bound method only by its function."""
    return linear.kernel_group.forward(linear.kernel_name, hidden)
