"""Decoding on preallocated buffers, one captured step per token (gpt-fast style).

After prefill the kept entries of every layer are copied, left-aligned per (row, KV head), into
static buffers ``[B, Hkv, C, D]`` whose capacity ``C`` is rounded up to a bucket, so that prompts
with similar budgets reuse the same buffers and the same captured graph. Step ``t`` (a counter the
step bumps in place, shared by all layers) writes the new token's key/value at slot
``kept[b, h] + t`` of each layer and attends over the slots below ``kept[b, h] + t + 1`` with a
split-K kernel that takes those lengths (no mask over the capacity); the token's RoPE position is
``first_position[b] + t``. Slot, position and valid length are thus separate quantities, and the
step's only per-call input is the token.

Buffers grow with the tokens actually generated, not with the limit asked for: a decode starts in
the bucket that holds its prompt's entries plus ``NEW_SLOTS`` new tokens (fewer if it asks for
fewer) and moves to a bucket twice as large whenever it fills (``StaticSession``). A pipeline's
decoders live in a ``DecoderPool``; one decode at a time uses them (its lock), since a decoder's
buffers and captured graphs serve one sequence of steps.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvpress_like.adapter import ModelAdapter
from kvpress_like.cache import CompressedCache
from kvpress_like.graph_step import GraphedStep
from kvpress_like.kernels.decode_attention import decode_attention, decode_attention_reference
from kvpress_like.sampling import Sampling, choose

logger = logging.getLogger("kvpress_like")

# Capacity granularity: prompts within one bucket share buffers and graphs. 256 slots rather than
# 1,024: at 32K FastKV keeps 3,277 entries per head, and 3,277 plus 65 new slots took 4,096 slots
# (25% more than the entries) in 1,024-slot buckets, 12.8 GiB at batch 128 (H200, session 12); in
# 256-slot ones 3,584 (9% more), 8.1 GiB less.
BUCKET = 256
# Slots for new tokens a decode starts with (fewer where it asks for fewer): a longer decode moves
# to a bucket twice as large when they fill (a copy and, compiled, a new capture), so few do.
NEW_SLOTS = 1024
# Static decoders (buffers + captured step) kept per pipeline for reuse; the least recently used
# goes first, so a server seeing many prompt lengths does not hold a static cache for each.
KEPT_DECODERS = 4
# Inductor options of the compiled step (measured on an H200, docs/performance.md): CUDA graphs
# remove the per-kernel launch cost; coordinate-descent tuning lowers batch-1 matrix-vector
# products to tuned Triton reductions that stream the weights faster than cuBLAS GEMV (gpt-fast's
# recipe); combo kernels launch independent small kernels (k and v projections, ...) together.
# The tuning benchmarks candidate configs and its picks vary from compile to compile: the same code
# decoded 32K x1 at 4.95 ms/token in one run and 5.51 in the next (docs/performance.md); a GPU
# step's projections therefore run in kernels with fixed tiles (PROJECTION_KERNELS), and the rest
# of such a step compiles untuned (TUNE_BESIDE_KERNELS).
COMPILE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "combo_kernels": True}
# Whether the attention kernel's last split merges the partial results (one launch per layer instead
# of two). Session 12's last arrival merged the G query heads of its KV head one after another, a
# serial tail that lost to a merge kernel of its own; merging all G at once (session 13) is level
# with it or ahead. H200, the kernel as a step runs it (benchmarks/decode_kernel.py --sweep), us
# per layer merged in the split kernel / in a merge kernel: 128K x1 21.14 / 21.27, 32K x1
# 12.01 / 12.13, x8 30.94 / 31.90, x16 54.52 / 56.06 (docs/performance.md).
MERGE_IN_SPLIT_KERNEL = True
# Compile the step once for every capacity bucket (capacity axis symbolic from the first bucket)
# instead of twice (static, then dynamo's automatic dynamic shapes). H200, speed.py: the 128K case
# after the 32K one starts in 8 s instead of ~100 s; 5.38 and 5.93 ms/token in two runs against
# 5.51 static, within the run-to-run spread of the tuned kernels (see COMPILE_OPTIONS).
SYMBOLIC_CAPACITY = True
# Likewise the batch axis: a new batch size starts decoding on the step compiled for another (with
# CUDA graphs, a new capture of the same code) instead of compiling again. Batch 1 compiles its
# own step (dynamo specialises sizes 0 and 1), every larger batch shares one.
SYMBOLIC_BATCH = True
# Which compiled steps replay CUDA graphs of our own (graph_step.py) instead of cudagraph trees,
# whose per-call host work outgrew the GPU's step under tensor parallelism: "sharded" models',
# "always" (tests, measurements) or "never".
OWN_GRAPHS = "sharded"
# A sharded step all-reduces one token's hidden state (8-16 KB at batch 1) twice per layer. H200 pair, in
# a CUDA graph (benchmarks/collectives.py): NCCL 11.8 us, the one-shot kernel over symmetric memory
# (peer loads, no NVLink multicast) 6.3 us. Inductor lowers the step's all-reduces of up to 128 KB
# to it when asked (``_collective.auto_select``), but its size check cannot take a symbolic batch:
# only the batch-1 step, compiled on its own anyway, asks; larger batches keep one compiled step
# for all (NCCL). Its buffers must be allocated outside any capture: with cudagraph trees they
# landed in the trees' pool, which refused them (torch 2.11).
ONE_SHOT_ALL_REDUCE = True
# A step on a GPU runs its projections in kernels/matvec.py with fixed tiles instead of inductor's
# tuned reductions (batch 1), whose picks vary from compile to compile, or cuBLAS (small batches);
# a layer's q, k and v projections (and gate and up) go in one launch. H200: 128K x1 4.88 vs 5.36
# ms/token in one run; 32K x8 5.76 vs 6.26 ms/step in two runs (docs/performance.md). Products the
# kernel does not serve (matvec.serves: wide launches above matvec.FEW_ROWS rows, all above
# matvec.MANY_ROWS) run cuBLAS inside the same op, so every batch above 1 shares one step.
PROJECTION_KERNELS = True
# With the projections on fixed tiles, the rest of the step (output head, norms, RoPE) compiles
# without coordinate-descent tuning: five fresh compiles of the 128K x1 step decoded within 0.2%
# of each other (4.90-4.91 ms/token, first call 39-45 s), against 2.7% (4.85-4.98, 61-77 s) tuned
# (H200, compile_spread.py, docs/performance.md).
TUNE_BESIDE_KERNELS = False


# An opaque op to torch.compile: the Triton launch (and its shape-derived launch parameters) stays
# out of the traced graph, and the CUDA graph captures it like any other kernel. ``arrivals`` is
# scratch the kernel leaves as it found it (zeros), hence declared unmutated.
@torch.library.custom_op("kvpress_like::decode_attention", mutates_args=())
def _decode_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    sliding_window: int,
    arrivals: torch.Tensor,
    merge_in_split: bool,
) -> torch.Tensor:
    window = sliding_window if sliding_window > 0 else None
    scratch = arrivals if merge_in_split else None
    return decode_attention(
        query, keys, values, lengths, scale, key_positions, query_positions, window, arrivals=scratch
    )


@_decode_attention_op.register_fake
def _(query, keys, values, lengths, scale, key_positions, query_positions, sliding_window, *merge):
    return torch.empty_like(query)


def capacity_bucket(entries: int) -> int:
    return -(-entries // BUCKET) * BUCKET


@dataclass
class StaticLayer:
    keys: torch.Tensor  # [B, Hkv, C, D]
    values: torch.Tensor  # [B, Hkv, C, D]
    positions: torch.Tensor  # [B, Hkv, C] long: true position of each slot's token
    kept: torch.Tensor  # [B, Hkv] long: slots filled by prefill


class _StepRouter:
    """The attention router of one decode step: write the new entry, attend over the valid slots."""

    def __init__(
        self, layers: list[StaticLayer], step: torch.Tensor, positions: torch.Tensor, arrivals: torch.Tensor
    ) -> None:
        self.layers, self.step, self.positions, self.arrivals = layers, step, positions, arrivals
        self.fused = arrivals.is_cuda  # the Triton kernel on a GPU, the reference elsewhere

    def attend(self, layer_idx, query, key, value, scaling, sliding_window):
        buf = self.layers[layer_idx]
        batch, heads = buf.kept.shape
        rows = torch.arange(batch, device=key.device)[:, None]
        cols = torch.arange(heads, device=key.device)[None, :]
        slot = buf.kept + self.step
        buf.keys[rows, cols, slot] = key[:, :, 0]
        buf.values[rows, cols, slot] = value[:, :, 0]
        if sliding_window is not None:  # only a window reads key positions
            buf.positions[rows, cols, slot] = self.positions[:, None]
        args = (query[:, :, 0], buf.keys, buf.values, slot + 1, scaling, buf.positions, self.positions)
        if self.fused:
            out = _decode_attention_op(*args, sliding_window or 0, self.arrivals, MERGE_IN_SPLIT_KERNEL)
        else:
            out = decode_attention_reference(*args, sliding_window)
        return out[:, :, None]


class StaticDecoder:
    """Static buffers for one (batch, capacity) bucket and the (optionally compiled) decode step."""

    def __init__(self, adapter: ModelAdapter, batch: int, capacity: int, compiled: bool) -> None:
        device = adapter.device
        self.adapter, self.capacity, self.compiled = adapter, capacity, compiled
        self.shape = (batch, adapter.local_kv_heads, capacity)  # this rank's heads under tensor parallelism
        # Allocated layer by layer as the first load (or take_over) fills them, each right before
        # its layer of the compressed cache is copied in and released: the kept entries are never
        # held twice, not even while the buffers are made.
        self.layers: list[StaticLayer] = []
        self.steps_done = torch.zeros((), dtype=torch.long, device=device)
        self.first_positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.arrivals = torch.zeros(batch * adapter.local_kv_heads, dtype=torch.int32, device=device)
        self.kernels = PROJECTION_KERNELS and device.type == "cuda"
        self.step = self._step
        if not compiled:
            return
        sharded = adapter.parallel.size > 1
        own_graphs = device.type == "cuda" and (
            OWN_GRAPHS == "always" or (OWN_GRAPHS == "sharded" and sharded)
        )
        options = COMPILE_OPTIONS
        if self.kernels and not TUNE_BESIDE_KERNELS:
            options = {**options, "coordinate_descent_tuning": False}
        if own_graphs:
            options = {**options, "triton.cudagraphs": False}
            if ONE_SHOT_ALL_REDUCE and batch == 1 and adapter.parallel.symmetric_memory():
                options["_collective.auto_select"] = True
        self.step = torch.compile(self._step, fullgraph=True, options=options)
        if own_graphs:
            self.step = GraphedStep(self.step, self.steps_done)

    def close(self) -> None:
        """Give the buffers' memory and the compiled step back now. Both sit in reference cycles (the
        step is a method of this decoder kept on it; a compile's leftovers refer to the buffers it
        traced) that only Python's cycle collector frees, at a time of its choosing: a closed
        32K x128 decoder's 16 GiB were still held through the next call's prefill (H200, session
        12). The buffers are this decoder's own (loads and take-overs copy into them), so their
        storage is freed whoever still refers to them."""
        for layer in self.layers:
            for buffer in vars(layer).values():
                buffer.untyped_storage().resize_(0)
        self.layers = []
        self.step = None

    def _buffers(self, index: int) -> StaticLayer:
        """Layer ``index``'s buffers, made now if they are the next ones to make."""
        if index < len(self.layers):
            return self.layers[index]
        adapter, device, dtype = self.adapter, self.adapter.device, self.adapter.dtype
        shape = self.shape
        self.layers.append(
            StaticLayer(
                torch.zeros(*shape, adapter.head_dim, dtype=dtype, device=device),
                torch.zeros(*shape, adapter.head_dim, dtype=dtype, device=device),
                torch.zeros(shape, dtype=torch.long, device=device),
                torch.zeros(shape[:2], dtype=torch.long, device=device),
            )
        )
        if self.compiled and len(self.layers) == adapter.info.num_layers:
            self._mark_for_compile()
        return self.layers[index]

    def _mark_for_compile(self) -> None:
        """Tell dynamo which buffers keep their address and which axes vary (before the first step)."""
        state = [self.steps_done, self.first_positions, self.arrivals]
        buffers = state + [t for layer in self.layers for t in vars(layer).values()]
        for buffer in buffers:
            torch._dynamo.mark_static_address(buffer)
        if SYMBOLIC_CAPACITY:
            for layer in self.layers:
                for buffer in (layer.keys, layer.values, layer.positions):
                    torch._dynamo.mark_dynamic(buffer, 2)
        if SYMBOLIC_BATCH:  # "maybe": a batch of 1 is specialised (dynamo's 0/1 rule)
            for buffer in buffers:
                torch._dynamo.maybe_mark_dynamic(buffer, 0)

    def load(self, cache: CompressedCache, release: bool = False) -> None:
        """Copy every layer's valid entries, left-aligned per (row, head), into the buffers; the
        next step decodes the token at ``cache.next_positions``. ``release``: drop each layer from
        ``cache`` once copied (a cache the decode owns), so the kept entries are not held twice."""
        for index in range(len(cache.layers)):
            dense = cache.layers[index].dense()
            if release:
                cache.layers[index] = None
            buf = self._buffers(index)
            order = torch.sort(dense.valid.to(torch.int8), dim=-1, descending=True, stable=True).indices
            size = order.shape[-1]
            slot = order[..., None].expand(-1, -1, -1, dense.keys.shape[-1])
            buf.keys[:, :, :size].copy_(dense.keys.gather(2, slot))
            buf.values[:, :, :size].copy_(dense.values.gather(2, slot))
            buf.positions[:, :, :size].copy_(dense.positions.gather(2, order))
            buf.kept.copy_(dense.valid.sum(dim=-1))
            del dense
        self.steps_done.zero_()
        self.first_positions.copy_(cache.next_positions)

    def take_over(self, smaller: StaticDecoder) -> None:
        """Continue where ``smaller`` (same batch, lower capacity) stands: its slots and counters."""
        for index, old in enumerate(smaller.layers):
            buf = self._buffers(index)
            for name in ("keys", "values", "positions"):
                getattr(buf, name)[:, :, : smaller.capacity].copy_(getattr(old, name))
            buf.kept.copy_(old.kept)
        self.steps_done.copy_(smaller.steps_done)
        self.first_positions.copy_(smaller.first_positions)

    def _step(
        self, tokens: torch.Tensor, noise: torch.Tensor | None, sampling: Sampling | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, V]`` after ``tokens`` ``[B]`` and the next token ``[B]``: their argmax, or
        the draw ``sampling.choose`` makes with ``noise``; one more step done."""
        adapter = self.adapter
        hidden = adapter.embed(tokens[:, None])
        positions = self.first_positions + self.steps_done
        pos = positions[:, None]
        router = _StepRouter(self.layers, self.steps_done, positions, self.arrivals)
        rotary = {t: adapter.rotary(hidden, pos, t) for t in dict.fromkeys(adapter.layer_types)}
        for idx, layer_type in enumerate(adapter.layer_types):
            hidden = adapter.run_layer(idx, hidden, rotary[layer_type], pos, router, kernels=self.kernels)
        self.steps_done.add_(1)
        logits = adapter.logits(hidden[:, -1])
        return logits, logits.argmax(dim=-1) if sampling is None else choose(logits, noise, sampling)


def decoder_bytes(adapter: ModelAdapter, batch: int, capacity: int) -> int:
    """Bytes of a ``StaticDecoder``'s buffers: keys, values, int64 slot positions and kept counts."""
    heads = batch * adapter.local_kv_heads
    per_layer = heads * capacity * (2 * adapter.head_dim * adapter.dtype.itemsize + 8) + 8 * heads
    return adapter.info.num_layers * per_layer


class DecoderPool:
    """A pipeline's static decoders by (batch, capacity bucket, compiled), least recently used
    dropped first; ``session`` hands them to one decode at a time.

    Idle decoders are kept for reuse only while memory allows: when a call's prefill or a new
    decoder needs more than the device has free, idle ones are dropped, least recently used first
    (at 32K x 128 rows one decoder holds 57 GiB; two would not fit an H200 beside a prefill)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.lock = threading.Lock()
        self.decoders: OrderedDict[tuple[int, int, bool], StaticDecoder] = OrderedDict()

    def get(
        self, batch: int, capacity: int, compiled: bool, in_use: StaticDecoder | None = None
    ) -> StaticDecoder:
        """The bucket's decoder, made if need be (``in_use``: the decoder a growing decode still
        reads from, never dropped to make room). Called with the lock held."""
        key = (batch, capacity, compiled)
        if key not in self.decoders:  # buffers and captured graphs are reused within a bucket
            idle = [old for old, decoder in self.decoders.items() if decoder is not in_use]
            for old in idle[: max(0, len(self.decoders) + 1 - KEPT_DECODERS)]:  # bounded: each holds
                self._drop(old)  # a whole static cache
            self._make_room(decoder_bytes(self.adapter, batch, capacity), in_use)
            self.decoders[key] = StaticDecoder(self.adapter, *key)
        self.decoders.move_to_end(key)
        return self.decoders[key]

    def make_room(self, needed: int) -> None:
        """Before a prefill: drop idle decoders until ``needed`` bytes are free. Skipped while a
        decode holds the pool (its decoders are not idle, and a prefill must not wait for it)."""
        if self.lock.acquire(blocking=False):
            try:
                self._make_room(needed)
            finally:
                self.lock.release()

    def _make_room(self, needed: int, in_use: StaticDecoder | None = None) -> None:
        free = self.adapter.free_memory()
        idle = [key for key, decoder in self.decoders.items() if decoder is not in_use]
        if free is None or free >= needed or not idle:
            return
        dropped = 0
        for key in idle:  # least recently used first
            dropped += decoder_bytes(self.adapter, key[0], key[1])
            self._drop(key)
            if free + dropped >= needed:
                break
        logger.info(
            "dropped idle static decoders (%.2f GiB of buffers) for %.2f GiB needed, %.2f GiB free",
            dropped / 2**30, needed / 2**30, free / 2**30,
        )  # fmt: skip

    @contextmanager
    def session(self, cache: CompressedCache, max_new_tokens: int, compiled: bool) -> Iterator[StaticSession]:
        """A decode of up to ``max_new_tokens`` steps from ``cache``, holding the pool meanwhile."""
        with self.lock:
            yield StaticSession(self, cache, max_new_tokens, compiled)

    def _drop(self, key: tuple[int, int, bool]) -> None:
        self.decoders.pop(key).close()

    def clear(self) -> None:
        with self.lock:
            for key in list(self.decoders):
                self._drop(key)


class StaticSession:
    """One decode on static buffers: starts in the smallest bucket that holds the prompt's entries
    and ``NEW_SLOTS`` new tokens, and moves to twice the capacity whenever the next step would not
    fit (the symbolic-capacity step compiles once for all buckets)."""

    def __init__(
        self, pool: DecoderPool, cache: CompressedCache, max_new_tokens: int, compiled: bool
    ) -> None:
        self.pool, self.compiled = pool, compiled
        self.batch = int(cache.next_positions.shape[0])
        self.prompt_slots = max(layer.valid.shape[2] for layer in cache.layers)  # widest (row, head)
        self.last_capacity = capacity_bucket(self.prompt_slots + max_new_tokens)
        first = capacity_bucket(self.prompt_slots + min(max_new_tokens, NEW_SLOTS))
        self.decoder = pool.get(self.batch, first, compiled)
        self.decoder.load(cache, release=True)  # the call's own cache: generate cloned a caller's
        self.steps = 0

    def step(
        self, tokens: torch.Tensor, noise: torch.Tensor | None = None, sampling: Sampling | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``StaticDecoder.step``; step ``t`` writes slot ``kept + t``, so it needs one more slot."""
        if self.prompt_slots + self.steps >= self.decoder.capacity:
            capacity = min(self.last_capacity, 2 * self.decoder.capacity)
            bigger = self.pool.get(self.batch, capacity, self.compiled, in_use=self.decoder)
            bigger.take_over(self.decoder)
            self.decoder = bigger
        self.steps += 1
        if self.compiled and SYMBOLIC_BATCH:  # per-call inputs: their batch axis is the buffers'
            for tensor in (tokens, noise):
                if tensor is not None:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.decoder.step(tokens, noise, sampling)
