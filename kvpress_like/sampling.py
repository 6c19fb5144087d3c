"""Sampling as one tensor function, so that it runs inside the decode step (compiled with it).

``choose`` applies what ``GenerationConfig`` asks of a sampled token as ``model.generate``'s warpers
do, in their order and with their rules: temperature (shifted first, as
``generation.StableTemperature``), top-k (every token below the k-th score dropped), top-p (drop
the least likely tokens while their probability adds up to at most ``1 - top_p``, the most likely
one kept), then draws as ``torch.multinomial(probs, 1)`` draws: the token maximising ``probs / q``
for exponential noise ``q`` (an exponential race, which is how torch draws one sample). The noise
comes from the caller's seeded generator, outside the step (``noise``), so a seed gives the token
``torch.multinomial`` gives with that generator, and no random state lives in a captured graph.
The settings are tensors, so one compiled step serves every temperature, k and p; only whether a
filter is asked (a sort of the vocabulary per step) changes the graph.

Other logits processors (repetition penalty, min_new_tokens, a caller's own) need the tokens so far
and run between steps instead (``generation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig


@dataclass(frozen=True)
class Sampling:
    """One decode's sampling settings as device tensors ``[]``; ``filtered``: top-k or top-p asked."""

    temperature: Tensor  # float32
    top_k: Tensor  # long, 0: no top-k
    # float32 1 - top_p, worked out in Python's double as transformers does (then rounded once):
    # the cut-off top-p compares with (0: no top-p)
    top_p_drop: Tensor
    filtered: bool

    @classmethod
    def of(cls, generation: GenerationConfig, device: torch.device) -> Sampling:
        temperature = 1.0 if generation.temperature is None else float(generation.temperature)
        top_k, top_p = (
            int(generation.top_k or 0),
            float(1.0 if generation.top_p is None else generation.top_p),
        )
        return cls(
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.long, device=device),
            torch.tensor(1 - top_p, dtype=torch.float32, device=device),
            top_k > 0 or top_p < 1.0,
        )


def noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Exponential noise ``[B, V]`` as ``torch.multinomial`` draws it from ``generator``."""
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(1, generator=generator)


def warp(logits: Tensor, sampling: Sampling) -> Tensor:
    """float32 scores ``[B, V]`` after temperature, top-k and top-p, as transformers' warpers leave
    them (dropped tokens at -inf; the temperature's shift changes no probability)."""
    scores = logits.float()
    tiny = torch.finfo(torch.float32).tiny
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / sampling.temperature.clamp(min=tiny)
    if not sampling.filtered:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    vocab = scores.shape[-1]
    kth = ascending.gather(-1, (vocab - sampling.top_k.clamp(min=1, max=vocab)).expand(scores.shape[0], 1))
    kth = torch.where(sampling.top_k > 0, kth, float("-inf"))  # top_k 0: nothing below it
    scores = scores.masked_fill(scores < kth, float("-inf"))
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= sampling.top_p_drop
    drop[..., -1] = False  # the most likely token stays
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def choose(logits: Tensor, noise: Tensor, sampling: Sampling) -> Tensor:
    """One token per row ``[B]`` drawn from ``logits`` ``[B, V]`` under ``sampling``, with the
    exponential ``noise`` ``[B, V]`` of ``noise()``."""
    return (warp(logits, sampling).softmax(dim=-1) / noise).argmax(dim=-1)
