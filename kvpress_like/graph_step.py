"""A compiled decode step replayed from CUDA graphs captured here (gpt-fast's way), not through
inductor's cudagraph trees: what a sharded model's step uses (``decode.StaticDecoder``).

Under tensor parallelism every call of the tree-managed step costs host time that grows with
the layers: dynamo checks its guards on every DTensor parameter and the trees check every static
input's address. H200 pair, 8B shape cut to 4 layers: 0.51 ms of guard checks per step (0.11 on
one GPU), a 1.33 ms step against a 0.73 ms floor, each NCCL all-reduce in it waiting 160 us for
the other rank's late launch (11.8 us alone). Here a replay is one graph launch after copying the
call's inputs into the graph's own: the whole 8B shape went from 9.39 to 3.77 ms per token,
together with the one-shot all-reduce of ``decode.ONE_SHOT_ALL_REDUCE`` (``docs/tensor_parallel.md``).

Each kind of call (greedy, sampled, sampled with top-k/top-p) gets one graph per decoder. Before
capture the compiled function runs once outside it: it compiles, tunes, sets up NCCL and
allocates its persistent buffers (the one-shot all-reduce's symmetric memory) there, and the
decoder's step counter is put back so that the step it ran is taken again, from the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from kvpress_like.sampling import Sampling

Step = Callable[[Tensor, Tensor | None, Sampling | None], tuple[Tensor, Tensor]]
Captured = tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, Tensor]]  # graph, inputs, outputs


def _inputs(tokens: Tensor, noise: Tensor | None, sampling: Sampling | None) -> list[Tensor]:
    """The tensors a call passes: tokens ``[B]``, noise ``[B, V]``, the sampling settings ``[]``."""
    extra = [] if sampling is None else [noise, sampling.temperature, sampling.top_k, sampling.top_p_drop]
    return [tokens, *extra]


class GraphedStep:
    """``step(tokens, noise, sampling) -> (logits [B, V], next token [B])`` of ``fn``, from one
    captured graph per kind of call. The outputs are the graph's: the next replay overwrites them."""

    def __init__(self, fn: Step, steps_done: Tensor) -> None:
        self.fn, self.steps_done = fn, steps_done
        self.graphs: dict[bool | None, Captured] = {}

    def __call__(
        self, tokens: Tensor, noise: Tensor | None, sampling: Sampling | None
    ) -> tuple[Tensor, Tensor]:
        kind = None if sampling is None else sampling.filtered
        if kind not in self.graphs:
            self.graphs[kind] = self._capture(tokens, noise, sampling)
        graph, inputs, outputs = self.graphs[kind]
        for static, value in zip(inputs, _inputs(tokens, noise, sampling), strict=True):
            static.copy_(value)
        graph.replay()
        return outputs

    def _capture(self, tokens: Tensor, noise: Tensor | None, sampling: Sampling | None) -> Captured:
        inputs = [tensor.clone() for tensor in _inputs(tokens, noise, sampling)]
        static_noise, static_sampling = None, None
        if sampling is not None:
            static_noise = inputs[1]
            static_sampling = replace(sampling, temperature=inputs[2], top_k=inputs[3], top_p_drop=inputs[4])
        start = self.steps_done.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the run outside capture; its step is taken again below
            self.fn(inputs[0], static_noise, static_sampling)
            self.steps_done.copy_(start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (NCCL's watchdog) must not void the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.fn(inputs[0], static_noise, static_sampling)
        return graph, inputs, outputs
