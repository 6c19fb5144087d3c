"""Decode attention over a static, left-aligned KV cache: one new query per row, GQA, optional window.

Shapes: query ``[B, Hq, D]``; keys/values ``[B, Hkv, C, D]`` (capacity C, slots ``[0, lengths[b, h])``
valid); lengths ``[B, Hkv]``; key_positions ``[B, Hkv, C]``; query_positions ``[B]``; out ``[B, Hq, D]``.
Query head h reads KV head ``h // (Hq // Hkv)``. A key is visible iff its slot is below the length and,
with a window, ``query_pos - key_pos < sliding_window``. No visible key gives a zero output.

``decode_attention`` runs a Triton split-K ("flash-decoding") kernel on CUDA, or in Triton's CPU
interpreter when ``TRITON_INTERPRET=1``; otherwise it falls back to ``decode_attention_reference``.
Launch parameters come from static shapes only, so a call does no host sync and is CUDA-graph capturable.
On Hopper and later GPUs the library's kernels use programmatic dependent launch (``PROGRAMMATIC_LAUNCH``).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

try:  # CPU builds of torch ship without triton: the reference must work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # the merge kernel holds [MAX_SPLITS, D] fp32 partials in registers
# fp32 partials a merge in the split kernel loads at once ([G, splits, D]): 64 registers per thread of
# its four warps.
MERGE_CHUNK = 8192
# Capacity slots per split at least (a split's share of a row's valid slots can be smaller): below
# this the q load and the merge outweigh the streaming.
MIN_SPLIT = 256
# At most this many programs per SM: more splits only add partial results to merge. Launches that
# already fill the GPU (32K x64, x128) are not split. H200, the kernel as a step runs it, us per
# layer at 1 / 2 / 3 splits: 32K x32 (256 programs) 110.45 / 103.34 / 125.53, x64 199.86 / 208.28 /
# 212.70 (session 13, docs/performance.md).
WAVES = 4
# Split-kernel tile at D=128 (BLOCK_N doubles at D <= 64): a 64-key K+V tile is 32 KiB in bf16, and two
# stages leave room for three programs per SM. Best of a small sweep on an H200 (BLOCK_N 32/64/128,
# 4/8 warps, 2-4 stages, 1-16 waves), within ~10% of each other; 8 warps was worse throughout.
TILE = {"block_n": 64, "num_warps": 4, "num_stages": 2}
# Programs of that tile an SM holds at once (its shared memory: 2 stages x 32 KiB each). A launch of
# a few more programs than the GPU holds runs them in two waves, the second nearly empty: the split
# count is chosen so that the programs fill whole waves (``_split_count``). H200, the kernel as a
# step runs it (benchmarks/decode_kernel.py --sweep): level with the earlier rule (WAVES programs
# per SM) at 128K x1, 1-2 us per layer faster at 32K x8 and x16 (docs/performance.md).
RESIDENT_PER_SM = 3
# Programmatic dependent launch (Hopper and later GPUs): the library's kernels are launched so that
# they may start before the kernel in front of them has finished, and wait (``griddepcontrol.wait``)
# only before they touch its results; a projection streams its first weight tile before that wait.
# H200, throughput.py, two processes of one call: 128K x1 4.58 ms/step with it, 4.76 without. 32K
# x8 took 5.33 and 5.58 with it in two calls, 5.49 without in a third: level, within the spread
# between calls (docs/performance.md, session 14). Inductor's own kernels launch as before (torch
# 2.11 has no option for it; newer inductors' ``triton.enable_pdl`` is untried here).
PROGRAMMATIC_LAUNCH = True


def _split_count(cap: int, programs: int, sms: int, per_sm: int | None = None) -> int:
    """The split count whose ``programs * splits`` programs waste the least of their last wave:
    ``ceil(programs * s / resident) / s`` (waves per unit of work) is least, more splits on a tie
    (the same waves, shorter programs); at most MAX_SPLITS, one per MIN_SPLIT slots of capacity
    and WAVES programs per SM."""
    resident = sms * (per_sm or RESIDENT_PER_SM)
    most = max(1, min(MAX_SPLITS, cap // MIN_SPLIT, WAVES * sms // programs))
    return min(range(1, most + 1), key=lambda s: (-(-programs * s // resident) / s, -s))


def decode_attention_reference(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    lengths: Tensor,
    scale: float,
    key_positions: Tensor | None = None,
    query_positions: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Plain PyTorch in fp32 with explicit masks; same contract as :func:`decode_attention`."""
    b, hq, d = query.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    q = query.float().reshape(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bhnd->bhgn", q, keys.float()) * scale
    visible = torch.arange(cap, device=keys.device) < lengths[..., None]  # [B, Hkv, C]
    if sliding_window is not None:
        visible = visible & (query_positions[:, None, None] - key_positions < sliding_window)
    probs = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
    probs = torch.where(visible.any(-1)[:, :, None, None], probs, 0.0)  # all-masked softmax is NaN
    return torch.einsum("bhgn,bhnd->bhgd", probs, values.float()).reshape(b, hq, d).to(query.dtype)


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (an H200's 132 for the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def launches_early(device: torch.device) -> bool:
    """Whether kernels on ``device`` use programmatic dependent launch (``PROGRAMMATIC_LAUNCH``)."""
    return (
        PROGRAMMATIC_LAUNCH and triton is not None and device.type == "cuda" and torch.version.hip is None
        and not triton.knobs.runtime.interpret and _capability(device) >= 9
    )  # fmt: skip


@functools.cache
def _capability(device: torch.device) -> int:
    """The device's compute capability, major version (9: Hopper)."""
    return torch.cuda.get_device_capability(device)[0]


def _launch_config(
    cap: int, d: int, programs: int, sms: int, num_splits: int | None, tile: dict
) -> tuple[int, int]:
    """(num_splits, BLOCK_N) from static shapes only."""
    num_splits = num_splits or _split_count(cap, programs, sms)
    # Small splits (tests, short caches) shrink the tile rather than mask most of it.
    fits = max(16, triton.next_power_of_2(math.ceil(max(cap, 1) / num_splits)))
    return num_splits, min(tile["block_n"] * (1 if d > 64 else 2), fits)


# The kernels are plain functions wrapped by `_jit` at first use rather than decorated at import: whether
# they are interpreted (TRITON_INTERPRET=1) is then decided by the environment of the call, not by
# whichever import happened to load this module first.
def _split_kernel(
    Q, K, V, Lens, KPos, QPos, MidO, MidLse, Out, Arrivals,
    qk_scale, window, cap,
    sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, slb, slh, spb, sph, spn, sqp, sob, soh, sod,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    MERGE_HERE: tl.constexpr, G_MERGE: tl.constexpr, S_CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # GQA: one program owns a KV head and all G query heads reading it, so every K/V tile is loaded
    # once and used by G rows. Scores use tl.dot with the G rows padded to G_PAD >= 16 (tl.dot's
    # minimum M): the tensor cores do 16/G times the needed flops, which is free in a memory-bound
    # kernel, whereas elementwise q*k products with tl.sum need a [G, BLOCK_N, D] register tile
    # that spills at D=128.
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // HKV).to(tl.int64), (pid_bh % HKV).to(tl.int64)
    if PDL:  # everything below reads the previous kernels' results (the query, the new cache entry)
        _wait_for_previous_kernel()
    length = tl.minimum(tl.load(Lens + b * slb + hk * slh).to(tl.int32), cap)
    # The row's valid slots, not the capacity, are what the splits share: every program streams the
    # same number of tiles however full the buffer is (a bucket can be twice the entries it holds).
    split_size = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_size
    end = tl.minimum(start + split_size, length)  # start >= end: the loop below does no work
    offs_g, offs_d, offs_n = tl.arange(0, G_PAD), tl.arange(0, D), tl.arange(0, BLOCK_N)
    heads = hk * G + offs_g
    q_ptr = Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd
    q = tl.load(q_ptr, mask=offs_g[:, None] < G, other=0.0)
    k_ptr = K + b * skb + hk * skh + offs_d[None, :] * skd
    v_ptr = V + b * svb + hk * svh + offs_d[None, :] * svd
    if HAS_WINDOW:
        q_pos = tl.load(QPos + b * sqp)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):  # no iteration for a split past the row's length
        offs = n0 + offs_n
        visible = offs < end
        k = tl.load(k_ptr + offs[:, None] * skn, mask=visible[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_WINDOW:
            k_pos = tl.load(KPos + b * spb + hk * sph + offs * spn, mask=visible, other=0)
            visible = visible & (q_pos - k_pos < window)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A tile may be fully outside the window: shift by 0 then, so exp2 gives 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs[:, None] * svn, mask=visible[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # Empty splits store a zero partial with lse = -inf: weight 0 in the merge, and no NaN to poison it.
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    rows = (b * HKV * G + heads) * NUM_SPLITS + split
    tl.store(MidO + rows[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=offs_g[:, None] < G)
    tl.store(MidLse + rows, tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf")), mask=offs_g < G)
    if MERGE_HERE:
        # The last split of this (row, KV head) to arrive merges all of them, saving a kernel
        # launch per layer. acq_rel orders the partials stored above before the count, and the
        # other splits' partials before the loads below; the last one resets the count to zero
        # for the next call (CUDA-graph replays reuse the same counters).
        # Every thread's partial stores come before the arrival: Triton's atomics do not promise a
        # block-wide barrier by themselves.
        tl.debug_barrier()
        arrived = tl.atomic_add(Arrivals + pid_bh, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            _merge_rows(MidO, MidLse, Out, b * HKV * G + hk * G, b, hk * G, sob, soh, sod,
                        G, G_MERGE, D, NUM_SPLITS, S_PAD, S_CHUNK)  # fmt: skip
            tl.atomic_xchg(Arrivals + pid_bh, 0)


def _merge_rows(
    MidO, MidLse, Out, row0, b, h0, sob, soh, sod,
    ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr, S_CHUNK: tl.constexpr,
):  # fmt: skip
    """Out[b, h0 + r] for r < ROWS = the partial outputs of row ``row0 + r`` weighted by their splits'
    softmax mass. All rows at once, S_CHUNK splits at a time: the loads of one chunk are in flight
    together, so the merge costs a few L2 round trips however many rows it has (a loop over rows
    would cost a few per row)."""
    offs_r, offs_s, offs_d = tl.arange(0, ROWS_PAD), tl.arange(0, S_PAD), tl.arange(0, D)
    live = offs_r < ROWS
    rows = row0 + offs_r
    # .cg: read through L2, where other programs' partials are (the last-arrival merge).
    lse = tl.load(
        MidLse + rows[:, None] * NUM_SPLITS + offs_s[None, :],
        mask=live[:, None] & (offs_s[None, :] < NUM_SPLITS), other=float("-inf"), cache_modifier=".cg",
    )  # fmt: skip
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse - m[:, None]), 1)  # empty splits (lse -inf) weigh 0
    acc = tl.zeros([ROWS_PAD, D], tl.float32)
    offs_c = tl.arange(0, S_CHUNK)
    for s0 in tl.static_range(0, S_PAD, S_CHUNK):
        splits = s0 + offs_c
        valid = live[:, None] & (splits[None, :] < NUM_SPLITS)  # [ROWS_PAD, S_CHUNK]
        part = rows[:, None] * NUM_SPLITS + splits[None, :]
        # The chunk's lse again (from L2): a register tensor cannot be cut into chunks.
        lse_part = tl.load(MidLse + part, mask=valid, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse_part - m[:, None])
        o = tl.load(
            MidO + part[:, :, None] * D + offs_d[None, None, :], mask=valid[:, :, None], other=0.0,
            cache_modifier=".cg",
        )  # fmt: skip
        acc += tl.sum(w[:, :, None] * o, 1)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    ptr = Out + b * sob + (h0 + offs_r)[:, None] * soh + offs_d[None, :] * sod
    tl.store(ptr, out.to(Out.dtype.element_ty), mask=live[:, None])


def _wait_for_previous_kernel():
    """Programmatic dependent launch: wait until the kernel in front has finished and its writes are
    visible (nothing before this may read them, or write what it reads), then let the next kernel's
    programs launch as they find room. Shared by the projection kernels (matvec.py)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


if triton is not None:  # device functions of the kernels below (jitted now: they look them up by name)
    _merge_rows = triton.jit(_merge_rows)
    _wait_for_previous_kernel = triton.jit(_wait_for_previous_kernel)


def _merge_kernel(
    MidO, MidLse, Out, sob, soh, sod,
    HQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        _wait_for_previous_kernel()
    row = tl.program_id(0)
    b, h = (row // HQ).to(tl.int64), (row % HQ).to(tl.int64)
    _merge_rows(MidO, MidLse, Out, row, b, h, sob, soh, sod, 1, 1, D, NUM_SPLITS, S_PAD, S_PAD)


@functools.cache
def _jit(interpret: bool) -> tuple:
    """(split, merge) kernels; ``interpret`` only keys the cache, triton.jit reads TRITON_INTERPRET."""
    return triton.jit(_split_kernel), triton.jit(_merge_kernel)


def decode_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    lengths: Tensor,
    scale: float,
    key_positions: Tensor | None = None,
    query_positions: Tensor | None = None,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
    arrivals: Tensor | None = None,
    tile: dict | None = None,
) -> Tensor:
    """Softmax(q·k·scale)·v over the visible keys (see the module docstring); ``num_splits`` overrides
    the split count chosen from the static shapes and ``tile`` the kernel's ``TILE`` (tests and
    tuning; its BLOCK_N doubles at D <= 64 as TILE's does). With ``arrivals`` (int32, at least
    ``B * Hkv`` zeros, left zero again by the call) the last split of each (row, KV head) merges the
    partial results itself: one kernel launch instead of two."""
    interpret = triton is not None and triton.knobs.runtime.interpret
    if triton is None or not (query.is_cuda or interpret):
        return decode_attention_reference(
            query, keys, values, lengths, scale, key_positions, query_positions, sliding_window
        )
    b, hq, d = query.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    if hq % hkv or d & (d - 1) or d < 16:
        raise ValueError(f"need Hq % Hkv == 0 and D a power of two >= 16, got Hq={hq} Hkv={hkv} D={d}")
    has_window = sliding_window is not None
    if has_window and (key_positions is None or query_positions is None):
        raise ValueError("a sliding window needs key_positions and query_positions")
    if arrivals is not None and (arrivals.dtype != torch.int32 or arrivals.numel() < b * hkv):
        raise ValueError(f"arrivals must be int32 with >= B*Hkv={b * hkv} entries, got {arrivals.dtype} "
                         f"with {arrivals.numel()}")  # fmt: skip
    g = hq // hkv
    g_pow2 = triton.next_power_of_2(g)
    tile = tile or TILE
    splits, block_n = _launch_config(cap, d, b * hkv, sm_count(query.device), num_splits, tile)
    mid_o = torch.empty(b, hq, splits, d, device=query.device, dtype=torch.float32)
    mid_lse = torch.empty(b, hq, splits, device=query.device, dtype=torch.float32)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    # Without a window the position pointers are never read: pass lengths with zero strides.
    kpos, kpos_strides = (key_positions, key_positions.stride()) if has_window else (lengths, (0, 0, 0))
    qpos, qpos_stride = (query_positions, query_positions.stride(0)) if has_window else (lengths, 0)
    # Triton launches on the current device: make it the operands' (a model on cuda:1, say).
    pdl = launches_early(query.device)
    early = {"launch_pdl": True} if pdl else {}
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        split_kernel, merge_kernel = _jit(interpret)
        s_pad = triton.next_power_of_2(splits)
        split_kernel[(b * hkv, splits)](
            query, keys, values, lengths, kpos, qpos, mid_o, mid_lse, out,
            lengths if arrivals is None else arrivals,  # not read unless merging here
            scale * LOG2E, int(sliding_window or 0), cap,
            *query.stride(), *keys.stride(), *values.stride(), *lengths.stride(), *kpos_strides, qpos_stride,
            *out.stride(),
            HKV=hkv, G=g, G_PAD=max(16, g_pow2), D=d, BLOCK_N=block_n,
            NUM_SPLITS=splits, S_PAD=s_pad, HAS_WINDOW=has_window,
            # fp32 inputs would otherwise be rounded to tf32 on GPU; the flag does not affect bf16/fp16.
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            MERGE_HERE=arrivals is not None, G_MERGE=g_pow2,
            S_CHUNK=min(s_pad, max(1, MERGE_CHUNK // (g_pow2 * d))),
            PDL=pdl, num_warps=tile["num_warps"], num_stages=tile["num_stages"], **early,
        )  # fmt: skip
        if arrivals is None:
            merge_kernel[(b * hq,)](
                mid_o, mid_lse, out, *out.stride(), HQ=hq, D=d, NUM_SPLITS=splits, S_PAD=s_pad,
                PDL=pdl, num_warps=4, **early,
            )  # fmt: skip
    return out
