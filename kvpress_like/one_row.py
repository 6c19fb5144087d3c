"""Projections of batch-1 decode steps on the one-row kernel (kernels/matvec.py).

``one_row_forwards(module)`` gives, for each ``nn.Linear`` child of an attention or MLP module,
a forward that runs the kernel (the adapter puts it on a twin of the child). Linears that read
one input (``GROUPS``: a layer's q, k and v projections; gate and up) share one launch: a call
whose result is pending takes it, any other call computes the whole group afresh and leaves the
other members' results pending. transformers' attention and MLP forwards call the members on one
``hidden_states``, in a fixed order, every step, so the first-called member recomputes the group
each step and no result outlives its step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from kvpress_like.kernels.matvec import matvec_op

# Linear children (by attribute name) that read one input, where a family has them separately.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """Linears reading one input, computed in one launch when the first of them is called."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.pending: dict[str, torch.Tensor] = {}

    def forward(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``linears[name](hidden)`` for ``hidden`` ``[..., K]`` of one row: ``[..., N_name]``."""
        if name in self.pending:
            return self.pending.pop(name)
        linears = list(self.linears.values())
        biases = [linear.bias for linear in linears] if linears[0].bias is not None else []
        outs = matvec_op(hidden, [linear.weight for linear in linears], biases)
        self.pending = dict(zip(self.linears, outs, strict=True))
        return self.pending.pop(name)


def one_row_forwards(module: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """A one-row-kernel forward for each of ``module``'s ``nn.Linear`` children, by attribute name."""
    linears = {name: child for name, child in module.named_children() if type(child) is nn.Linear}
    groups = []
    for names in GROUPS:
        members = {name: linears[name] for name in names if name in linears}
        with_bias = {member.bias is not None for member in members.values()}
        if len(members) == len(names) and len(with_bias) == 1:  # one launch takes all biases or none
            groups.append(members)
    grouped = {name for group in groups for name in group}
    groups += [{name: linear} for name, linear in linears.items() if name not in grouped]
    forwards = {}
    for members in groups:
        group = _Group(members)
        forwards.update({name: functools.partial(group.forward, name) for name in members})
    return forwards
