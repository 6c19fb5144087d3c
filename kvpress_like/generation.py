"""Producing tokens: sampling, the decode loop around a step function, and its clocks.

The loop never waits for the step it queued: step times are CUDA events, and the "all rows
finished" flag is read one step late (``FinishedFlag``).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from kvpress_like.config import GenerationConfig
from kvpress_like.results import Context, Generation

Step = Callable[[Tensor], tuple[Tensor, Tensor]]  # next tokens [B] -> logits [B, V], their argmax [B]


def decode_loop(
    context: Context, gen: GenerationConfig, step: Step, eos: Tensor, tokenizer: Any
) -> Generation:
    """Tokens from the context's last logits on, ``step`` giving the logits ``[B, V]`` and their
    argmax ``[B]`` after each (the argmax inside a compiled step: no separate, slower launch).
    ``eos`` ``[E]``: the end-of-sequence ids."""
    logits = context.last_logits
    greedy = logits.argmax(dim=-1)
    generator = None
    if gen.do_sample and gen.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(gen.seed)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    all_finished = FinishedFlag(logits.device)
    clock = StepClock(logits.device)
    steps: list[torch.Tensor] = []
    for index in range(gen.max_new_tokens):
        token = sample(logits, gen, generator) if gen.do_sample else greedy
        token = torch.where(finished, eos[0] if len(eos) else token, token)
        steps.append(token)
        finished |= torch.isin(token, eos)
        if index == gen.max_new_tokens - 1 or (gen.stop_on_eos and all_finished.check(finished)):
            break
        logits, greedy = step(token)
        clock.tick()
    step_seconds = clock.seconds()
    tokens = torch.stack(steps, dim=1).tolist()
    token_ids = [until_eos(row, set(eos.tolist())) if gen.stop_on_eos else row for row in tokens]
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in token_ids]
    stats = replace(
        context.stats,
        decode_seconds_per_token=statistics.median(step_seconds) if step_seconds else 0.0,
        decode_step_seconds=tuple(step_seconds),
        new_tokens=tuple(len(row) for row in token_ids),
    )
    return Generation(token_ids, texts, stats)


def sample(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float logits ``[B, V]`` by temperature / top-p sampling."""
    # Shifted so that the top logit is 0, and the temperature kept above the dtype's smallest
    # normal number (1e-300 is 0 in float32): a tiny temperature gives the argmax, not 0 / 0.
    temperature = max(gen.temperature, torch.finfo(logits.dtype).tiny)
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > gen.top_p  # the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StepClock:
    """Seconds between consecutive ``tick``s, from CUDA events on a GPU (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.marks: list = []
        self.tick()

    def tick(self) -> None:
        if self.stream is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.stream is not None:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


class FinishedFlag:
    """Whether every row has finished, read without stalling the GPU's queue: on CUDA ``check``
    queues a copy to pinned memory and answers from the previous call's copy, so a finished batch
    costs one extra step (its tokens are cut at EOS) instead of a host sync on every step."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.host = torch.zeros(2, dtype=torch.bool, pin_memory=self.stream is not None)
        self.copied: list[torch.cuda.Event] = []

    def check(self, finished: torch.Tensor) -> bool:
        if self.stream is None:
            return bool(finished.all())
        slot = len(self.copied) % 2
        self.host[slot].copy_(finished.all(), non_blocking=True)
        self.copied.append(torch.cuda.Event())
        self.copied[-1].record(self.stream)
        if len(self.copied) < 2:
            return False
        self.copied[-2].synchronize()
        return bool(self.host[1 - slot])


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def elapsed(start: float, result: torch.Tensor) -> float:
    """Seconds since ``start`` once the device has produced ``result``."""
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start
