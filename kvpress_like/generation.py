"""Producing tokens: the decode loop around a step function, with transformers' own logits
processors, stopping criteria and streamers, and its clocks.

The step (eager, static or compiled: ``decode.py``) gives the logits and the next token: the argmax,
or, when sampling asks only for temperature, top-k and top-p, a draw made inside the step
(``sampling.py``: no extra launches between compiled steps). Everything else a ``GenerationConfig``
asks (repetition penalty, min_new_tokens, a caller's processors, stop strings) runs here, between
steps, through transformers' ``LogitsProcessor`` and ``StoppingCriteria`` classes (with such a
processor the warpers and the draw run here too); every decode path honours the same settings.
The loop never waits for the step it queued: step times are CUDA events, the "all rows finished"
flag is read one step late (``FinishedFlag``), and tokens reach a streamer one step late
(``TokenSink``).
"""

from __future__ import annotations

import inspect
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from kvpress_like.results import Context, Generation
from kvpress_like.sampling import Sampling, choose
from kvpress_like.sampling import noise as draw_noise

# next tokens [B], then the exponential noise [B, V] and the settings of a draw inside the step (None:
# greedy) -> logits [B, V] and the token chosen from them [B] (the argmax, or the draw)
Step = Callable[[Tensor, Tensor | None, Sampling | None], tuple[Tensor, Tensor]]
TokenCallback = Callable[[list[int | None]], None]  # one id per row, None for a finished row


@dataclass
class Request:
    """What one decode is asked for, beyond the step that makes the logits."""

    generation: GenerationConfig  # checked (settings.generation_config): max_new_tokens is set
    eos: Tensor  # [E] long: end-of-sequence ids
    seed: int | None = None
    stop_on_eos: bool = True
    logits_processor: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    stopping_criteria: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)
    streamer: Any = None  # transformers' streamer protocol: put(ids), end()
    on_token: TokenCallback | None = None
    output_scores: bool = False
    tokenizer: Any = None


class StableTemperature(LogitsProcessor):
    """transformers' temperature scaling, shifted first so that the top score is 0 and kept above
    the dtype's smallest normal number: a tiny temperature (1e-300 is 0 in float32) gives the argmax
    instead of inf / inf. Sampling is unchanged: softmax, top-k and top-p ignore a shift."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        shifted = scores - scores.amax(dim=-1, keepdim=True)
        return shifted / max(self.temperature, torch.finfo(scores.dtype).tiny)


def samples_in_step(request: Request) -> bool:
    """Whether the step itself draws the tokens: sampling asks for nothing but temperature, top-k
    and top-p (no processor that reads the tokens so far, no processed scores returned)."""
    gen = request.generation
    return bool(
        gen.do_sample
        and (gen.repetition_penalty is None or gen.repetition_penalty == 1.0)
        and not (gen.min_new_tokens and len(request.eos))
        and not request.logits_processor
        and not request.output_scores
    )


def logits_processors(request: Request, prompt_width: int, pad_lengths: Tensor) -> LogitsProcessorList:
    """transformers' processors for ``request.generation``, in the order ``model.generate`` builds
    them: penalties and constraints, the caller's own, then (sampling only) the warpers; none when
    the step draws the tokens."""
    if samples_in_step(request):
        return LogitsProcessorList()
    gen, processors = request.generation, LogitsProcessorList()
    if gen.repetition_penalty is not None and gen.repetition_penalty != 1.0:
        kwargs = {}
        if "prompt_ignore_length" in inspect.signature(RepetitionPenaltyLogitsProcessor).parameters:
            kwargs["prompt_ignore_length"] = pad_lengths  # left padding is no part of the prompt
        processors.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty, **kwargs))
    if gen.min_new_tokens and len(request.eos):
        processors.append(
            MinNewTokensLengthLogitsProcessor(
                prompt_width, gen.min_new_tokens, request.eos, request.eos.device
            )
        )
    processors.extend(request.logits_processor)
    if gen.do_sample:
        if gen.temperature is not None and gen.temperature != 1.0:
            processors.append(StableTemperature(gen.temperature))
        if gen.top_k:
            processors.append(TopKLogitsWarper(top_k=gen.top_k))
        if gen.top_p is not None and gen.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=gen.top_p))
    return processors


def stopping_criteria(request: Request) -> StoppingCriteriaList:
    """transformers' stop-string criterion (its tokenizer was checked before prefill, in
    ``settings.check_call``), then the caller's own."""
    criteria = StoppingCriteriaList()
    if request.generation.stop_strings:
        criteria.append(StopStringCriteria(request.tokenizer, request.generation.stop_strings))
    criteria.extend(request.stopping_criteria)
    return criteria


def decode_loop(context: Context, request: Request, step: Step) -> Generation:
    """Tokens from the context's last logits on, ``step`` giving the logits ``[B, V]`` and the
    chosen token ``[B]`` after each (inside a compiled step: no separate, slower launches)."""
    gen, eos = request.generation, request.eos
    logits = context.last_logits
    device, rows = logits.device, logits.shape[0]
    # What processors read, [B, T]: each row's tokens right-aligned and its padding (left, or
    # between a context and its continuation) before them, as in a left-padded model.generate batch,
    # so that the repetition penalty can leave the padding out.
    pad_lengths = (~context.valid.bool()).sum(dim=-1)
    processors = logits_processors(request, context.ids.shape[1], pad_lengths)
    criteria = stopping_criteria(request)
    history = None
    if processors or criteria:
        padding_first = torch.sort(context.valid.to(torch.int8), dim=-1, stable=True).indices
        history = context.ids.gather(1, padding_first)
    generator = None
    if gen.do_sample and request.seed is not None:
        generator = torch.Generator(device=device).manual_seed(request.seed)
    sampling = Sampling.of(gen, device) if samples_in_step(request) else None

    def noise() -> Tensor | None:  # the next draw's, from the seeded generator (None: greedy)
        return None if sampling is None else draw_noise(logits.shape, generator, device)

    chosen = logits.argmax(dim=-1) if sampling is None else choose(logits, noise(), sampling)
    stops = eos if request.stop_on_eos else eos[:0]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), gen.max_new_tokens, dtype=torch.long, device=device)
    all_finished = FinishedFlag(device)
    clock = StepClock(device)
    sink = TokenSink(device, request.streamer, request.on_token)
    if request.streamer is not None:
        request.streamer.put(context.ids.cpu())  # the prompt first, as generate does
    steps: list[Tensor] = []
    scores_out: list[Tensor] = []
    try:
        for index in range(gen.max_new_tokens):
            if processors or (gen.do_sample and sampling is None):
                scores = processors(history, logits) if processors else logits
                token = sample(scores, generator) if gen.do_sample else scores.argmax(dim=-1)
            else:  # greedy, or drawn in the step
                scores, token = logits, chosen
            if request.output_scores:  # a copy: a CUDA-graph step overwrites its outputs at the next replay
                scores_out.append(scores.clone())
            live = ~finished
            token = torch.where(finished, eos[0] if len(eos) else token, token)
            steps.append(token)
            if history is not None:
                history = torch.cat([history, token[:, None]], dim=1)
            done = torch.isin(token, stops)
            if criteria:
                done |= criteria(history, scores)
            lengths = torch.where(live & done, index + 1, lengths)
            finished |= done
            sink.push(token, live)
            if index == gen.max_new_tokens - 1 or all_finished.check(finished):
                break
            logits, chosen = step(token, noise(), sampling)
            clock.tick()
    finally:
        sink.close()  # a streamer's reader must not wait forever, also after an error
    step_seconds = clock.seconds()
    lengths_host = lengths.clamp(max=len(steps)).tolist()
    tokens = torch.stack(steps, dim=1).tolist()
    token_ids = [row[:n] for row, n in zip(tokens, lengths_host, strict=True)]
    texts = None
    if request.tokenizer is not None:
        texts = [request.tokenizer.decode(row, skip_special_tokens=True) for row in token_ids]
    stats = replace(
        context.stats,
        decode_seconds_per_token=statistics.median(step_seconds) if step_seconds else 0.0,
        decode_step_seconds=tuple(step_seconds),
        new_tokens=tuple(len(row) for row in token_ids),
    )
    scores = tuple(scores_out[: max(lengths_host)]) if request.output_scores else None
    return Generation(token_ids, texts, stats, scores)


def sample(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row ``[B]`` drawn from processed scores ``[B, V]``, as ``model.generate`` draws."""
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TokenSink:
    """Hands each step's tokens to a transformers streamer (``put`` one row's ids, then ``end``)
    and/or a per-token callback. On CUDA the tokens are copied to pinned memory without waiting
    and handed over one step later: the host then waits only on a copy queued a whole step
    earlier, which has landed by then, so the GPU's queue never drains (H200, 32K: 5.044 vs 5.047
    ms/token with and without a streamer). A streamer takes one row, as transformers' do."""

    def __init__(self, device: torch.device, streamer: Any, on_token: TokenCallback | None) -> None:
        self.streamer, self.on_token = streamer, on_token
        self.lagged = device.type == "cuda"
        self.pending: tuple[Tensor, Any] | None = None
        self.active = streamer is not None or on_token is not None

    def push(self, tokens: Tensor, live: Tensor) -> None:
        """``tokens`` ``[B]`` of this step; ``live`` ``[B]``: rows not finished before it."""
        if not self.active:
            return
        packed = torch.stack([tokens, live.long()])
        if not self.lagged:
            self._deliver(packed)
            return
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._flush()
        self.pending = (host, event)

    def close(self) -> None:
        if self.active:
            self._flush()
        if self.streamer is not None:
            self.streamer.end()

    def _flush(self) -> None:
        if self.pending is not None:
            host, event = self.pending
            event.synchronize()
            self._deliver(host)
            self.pending = None

    def _deliver(self, packed: Tensor) -> None:
        tokens, live = packed.tolist()
        if self.streamer is not None and live[0]:
            self.streamer.put(torch.tensor([tokens[0]]))
        if self.on_token is not None and any(live):
            self.on_token([t if alive else None for t, alive in zip(tokens, live, strict=True)])


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


def elapsed(start: float, result: torch.Tensor) -> float:
    """Seconds since ``start`` once the device has produced ``result``."""
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start
