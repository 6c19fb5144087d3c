"""Decode's matrix products, ``y_i = x @ W_i.T (+ b_i)``, for up to three weights at once.

Shapes: x ``[..., K]`` holding one row (a batch-1 decode step's hidden state) or a few (up to
``FEW_ROWS``, or ``MANY_ROWS`` for narrow launches: a small batch's); each weight ``[N_i, K]`` (an
``nn.Linear`` weight, row-major), bias ``[N_i]`` or None; each out ``[..., N_i]`` in x's dtype,
accumulated in fp32. A decode step of a small batch is a chain of such products, each reading its
whole weight once, so each is bound by how fast the weights stream from memory.

``matvec`` launches one Triton kernel for all the weights given (a layer's q, k and v projections
read the same input: one launch streams all three), each program streaming ``BLOCK_N`` rows of
one weight ``BLOCK_K`` columns at a time, with an eviction hint that keeps the once-read weights
from displacing the rest of L2. One row is reduced on the CUDA cores; a few rows go through the
tensor cores, padded to their smallest tile, and a launch of few programs may split each block
of weight rows over several programs, each summing a part of the columns (``FEW_ROWS_SPLIT_K``).
On programmatic dependent launch (``decode_attention.PROGRAMMATIC_LAUNCH``) each program loads its
first weight tile before it waits for the kernel in front of it: weights are never a kernel's output.
The tiles are fixed (``TILE``, ``FEW_ROWS_TILE``, ``MANY_ROWS_TILE``, from H200 sweeps,
docs/performance.md), so two processes always run the same kernels: inductor's coordinate-descent
tuning of the same products picks different configurations from compile to compile, 4% apart per
layer. Launch parameters come from static shapes only (no host sync, CUDA-graph capturable). Without
CUDA or triton, for more rows or for operands it does not take (``serves``), it is
``torch.nn.functional.linear`` per weight.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpress_like.kernels.decode_attention import _wait_for_previous_kernel, launches_early, sm_count

try:  # CPU builds of torch ship without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


@dataclass(frozen=True)
class Tile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # Programs per block of weight rows, each over its share of the columns (a few rows only): more
    # programs for a launch that would leave SMs idle. Needs zeroed counters (``launch``).
    split_k: int = 1


# H200 sweep of 114 tiles over the Llama-3.1-8B projections (benchmarks/matvec.py): this one was the
# best, or within 0.1 us of it, for q, o, q+k+v, gate+up and down (10.1, 10.1, 14.0, 54.4 and 28.9
# us: 3.3-4.3 TB/s); four rows of 2048 columns give each program 16 KB of loads in flight.
TILE = Tile(block_n=4, block_k=2048, num_warps=4, num_stages=1)


# Two to FEW_ROWS rows (small decode batches) go through the tensor cores instead: their smallest
# product axis is 16 long, so the rows pad to it, and each program streams BLOCK_N weight rows. H200
# sweep of 54 tiles at 2, 4, 8 and 16 rows (benchmarks/matvec.py --rows): this one was the best
# for a layer at every row count, 15.8-16.1 us for q+k+v (cuBLAS, three launches: 28.5-29.3) and
# 12.3-12.5 for o (13.2-13.6). Over FEW_ROWS_MAX_K columns (Llama's down projection, 14336) its
# 128 programs for 4096 rows were 10% slower than cuBLAS (35.9 vs 32.2 us): cuBLAS keeps those.
FEW_ROWS = 16
FEW_ROWS_TILE = Tile(block_n=32, block_k=128, num_warps=4, num_stages=5)
FEW_ROWS_MAX_K = 8192
# A launch of more than two programs per SM keeps three stages in flight instead of five: less
# shared memory per program, so more of them share an SM. Same sweep, 8 rows: gate + up (896
# programs) 59.0 us at three stages against 63.7 at five, gate alone (448) 31.0 against 32.5, while
# q + k + v (192) took 19.3 against 16.1.
FEW_ROWS_WIDE_STAGES = 3
# FEW_ROWS + 1 to MANY_ROWS rows: the kernel serves narrow launches only, of at most two programs per
# SM, on MANY_ROWS_TILE. Same kind of sweep at 32 rows (54 tiles): q + k + v 18.0 us on this tile
# against cuBLAS's three launches' 29.8, o 14.1 against 13.9 (level); gate + up (896 programs) took
# 69.4 on this tile and 65.1 on the best one, against cuBLAS's 63.7. Down (14336 columns, 42.0
# against 33.8) stays on cuBLAS by FEW_ROWS_MAX_K.
MANY_ROWS = 32
MANY_ROWS_TILE = Tile(block_n=32, block_k=128, num_warps=4, num_stages=4)
# Splitting the columns of few-rows launches of at most one program per SM (o: 128 blocks of 32
# rows; down: 128, on cuBLAS by FEW_ROWS_MAX_K unless split) into this many parts; 1: no split. The
# parts' partial sums are added by the last part of each block to finish, in a fixed order (the
# same result every run). Off: 2 parts within 2%, 4 and 8 slower. H200, 8 rows, us (matvec.py
# --rows 8,16 --splits 2,4,8): o 12.4 unsplit, 12.2 / 14.6 / 17.7 in 2 / 4 / 8 parts; down 32.5 on
# cuBLAS, 32.0 / 34.4 / 37.8; the 32K x8 step took 5.60 ms in 4 parts against 5.49 unsplit
# (docs/performance.md, session 14). Read when a pipeline is built (its projection groups hold the
# counters only when it is above 1) and at each launch.
FEW_ROWS_SPLIT_K = 1


def tile_for(
    k: int, rows: int = 1, sizes: Sequence[int] = (), device: torch.device | None = None, counters: int = 0
) -> Tile:
    """The fixed tile for ``rows`` rows of ``k`` columns (its columns cut to ``k`` where that is
    shorter) and a launch over weights of ``sizes`` rows on ``device`` (a CUDA device), with
    ``counters`` zeroed counters at hand for a split launch."""
    if rows == 1:
        tile, least = TILE, 32 * TILE.num_warps
    elif rows > FEW_ROWS:
        tile, least = MANY_ROWS_TILE, 16
    else:
        tile, least = FEW_ROWS_TILE, 16
        programs = sum(triton.cdiv(n, tile.block_n) for n in sizes)
        if device is not None and programs > 2 * sm_count(device):
            tile = replace(tile, num_stages=FEW_ROWS_WIDE_STAGES)
        elif _splits(rows, sizes, device, counters):
            tile = replace(tile, split_k=FEW_ROWS_SPLIT_K)
    return replace(tile, block_k=min(tile.block_k, max(least, triton.next_power_of_2(k))))


def _splits(rows: int, sizes: Sequence[int], device: torch.device | None, counters: int) -> bool:
    """Whether a few-rows launch splits its columns (``FEW_ROWS_SPLIT_K``): at most one program
    per SM unsplit, and a counter for each of its blocks."""
    blocks = sum(triton.cdiv(n, FEW_ROWS_TILE.block_n) for n in sizes)
    return (
        FEW_ROWS_SPLIT_K > 1 and 1 < rows <= FEW_ROWS and device is not None
        and blocks <= min(counters, sm_count(device))
    )  # fmt: skip


def _rows_block(X, W, B, Y, block, N, K, swn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Y[rows of ``block``] = W[rows] @ X (+ B[rows])."""
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_n < N
    w_ptr = W + offs_n.to(tl.int64)[:, None] * swn + offs_k[None, :]
    x_ptr = X + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_first = 0
    if PDL:  # the first weight tile streams while the previous kernel finishes; x only after it has
        w = _weight_tile(w_ptr, rows, offs_k, 0, K, EVEN_K)
        _wait_for_previous_kernel()
        acc += w.to(tl.float32) * _vector_tile(x_ptr, offs_k, 0, K, EVEN_K).to(tl.float32)[None, :]
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
        k_first = BLOCK_K
    for k0 in range(k_first, K, BLOCK_K):
        w = _weight_tile(w_ptr, rows, offs_k, k0, K, EVEN_K)
        acc += w.to(tl.float32) * _vector_tile(x_ptr, offs_k, k0, K, EVEN_K).to(tl.float32)[None, :]
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=rows, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=rows)


def _weight_tile(w_ptr, rows, offs_k, k0, K, EVEN_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` weights from column ``k0``, read once: evicted from L2 first."""
    if EVEN_K:
        return tl.load(w_ptr, mask=rows[:, None], other=0.0, eviction_policy="evict_first")
    cols = k0 + offs_k < K
    return tl.load(w_ptr, mask=rows[:, None] & cols[None, :], other=0.0, eviction_policy="evict_first")


def _vector_tile(x_ptr, offs_k, k0, K, EVEN_K: tl.constexpr):
    """``[BLOCK_K]`` of the one row from column ``k0``."""
    if EVEN_K:
        return tl.load(x_ptr)
    return tl.load(x_ptr, mask=k0 + offs_k < K, other=0.0)


def _rows_tile(x_ptr, batch, offs_k, k0, K, EVEN_K: tl.constexpr):
    """``[BLOCK_K, BLOCK_M]``: the batch's rows from column ``k0``, transposed."""
    if EVEN_K:
        return tl.load(x_ptr, mask=batch[None, :], other=0.0)
    return tl.load(x_ptr, mask=batch[None, :] & (k0 + offs_k < K)[:, None], other=0.0)


def _few_rows_block(X, W, B, Y, block, M, N, K, sxm, swn, Part, Counters, counter, part, n_off, NT,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    """Y[:M, rows of ``block``] = X[:M] @ W[rows].T (+ B[rows]) on the tensor cores, the weight rows as
    the product's left operand (its axis is at least 16 long; the batch's ``M`` rows pad to BLOCK_M).
    With SPLIT_K > 1 this program sums the columns of part ``part`` only, into Part[part, :M,
    n_off + rows] (``NT`` columns a row), and the block's last part to finish adds the parts up."""
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_n < N
    batch = offs_m < M
    if SPLIT_K == 1:
        k_lo, k_hi = 0, K
    else:  # this part's columns: whole BLOCK_K tiles (a last part may hold fewer columns, or none)
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = part * k_len
        k_hi = tl.minimum(k_lo + k_len, K)
    w_ptr = W + offs_n.to(tl.int64)[:, None] * swn + (k_lo + offs_k)[None, :]
    # X transposed: [BLOCK_K, BLOCK_M]
    x_ptr = X + offs_m.to(tl.int64)[None, :] * sxm + (k_lo + offs_k)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_first = k_lo
    if PDL:  # as in _rows_block: the first weight tile before the wait, x after it
        w = _weight_tile(w_ptr, rows, offs_k, k_lo, k_hi, EVEN_K)
        _wait_for_previous_kernel()
        acc = tl.dot(w, _rows_tile(x_ptr, batch, offs_k, k_lo, k_hi, EVEN_K), acc)
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
        k_first = k_lo + BLOCK_K
    for k0 in range(k_first, k_hi, BLOCK_K):
        w = _weight_tile(w_ptr, rows, offs_k, k0, k_hi, EVEN_K)
        acc = tl.dot(w, _rows_tile(x_ptr, batch, offs_k, k0, k_hi, EVEN_K), acc)
        w_ptr += BLOCK_K
        x_ptr += BLOCK_K
    if SPLIT_K == 1:
        _store_block(acc, B, Y, offs_n, offs_m, rows, batch, N, HAS_BIAS)
    else:
        held = rows[:, None] & batch[None, :]
        part_ptr = Part + offs_m[None, :] * NT + (n_off + offs_n)[:, None]
        tl.store(part_ptr + part * M * NT, acc, mask=held)
        # As the attention kernel's merge: every thread's stores before the arrival; acq_rel orders
        # them before the count and the other parts' before the loads; the last resets the count.
        tl.debug_barrier()
        arrived = tl.atomic_add(Counters + counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for other in tl.static_range(SPLIT_K):  # a fixed order: the same sum every run
                total += tl.load(part_ptr + other * M * NT, mask=held, other=0.0, cache_modifier=".cg")
            _store_block(total, B, Y, offs_n, offs_m, rows, batch, N, HAS_BIAS)
            tl.atomic_xchg(Counters + counter, 0)


def _store_block(acc, B, Y, offs_n, offs_m, rows, batch, N, HAS_BIAS: tl.constexpr):
    """Y[offs_m, offs_n] = acc (+ B[offs_n]), acc ``[BLOCK_N, BLOCK_M]`` fp32."""
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=rows, other=0.0).to(tl.float32)[:, None]
    y_ptr = Y + offs_m[None, :] * N + offs_n[:, None]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=rows[:, None] & batch[None, :])


def _block(X, W, B, Y, block, M, N, K, sxm, swn, Part, Counters, counter, part, n_off, NT,
           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    if BLOCK_M == 1:
        _rows_block(X, W, B, Y, block, N, K, swn, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K, PDL)
    else:
        _few_rows_block(X, W, B, Y, block, M, N, K, sxm, swn, Part, Counters, counter, part, n_off, NT,
                        HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SPLIT_K, PDL)  # fmt: skip


def _matvec_kernel(
    X, W0, W1, W2, B0, B1, B2, Y0, Y1, Y2, Part, Counters, M, N0, N1, N2, K, sxm, sw0, sw1, sw2, BLOCKS0,
    BLOCKS01, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Blocks [0, BLOCKS0) stream W0, [BLOCKS0, BLOCKS01) W1, the rest W2, SPLIT_K programs each (one
    # per part of the columns); BLOCK_M 1: one row. A block's counter is its index.
    pid = tl.program_id(0)
    blk, part = pid // SPLIT_K, pid % SPLIT_K
    NT = N0 + N1 + N2
    if blk < BLOCKS0:
        _block(X, W0, B0, Y0, blk, M, N0, K, sxm, sw0, Part, Counters, blk, part, 0, NT,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SPLIT_K, PDL)  # fmt: skip
    elif blk < BLOCKS01:
        _block(X, W1, B1, Y1, blk - BLOCKS0, M, N1, K, sxm, sw1, Part, Counters, blk, part, N0, NT,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SPLIT_K, PDL)  # fmt: skip
    else:
        _block(X, W2, B2, Y2, blk - BLOCKS01, M, N2, K, sxm, sw2, Part, Counters, blk, part, N0 + N1, NT,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SPLIT_K, PDL)  # fmt: skip


if triton is not None:  # device functions of the kernel below (jitted now: they are looked up by name)
    _weight_tile = triton.jit(_weight_tile)
    _vector_tile = triton.jit(_vector_tile)
    _rows_tile = triton.jit(_rows_tile)
    _rows_block = triton.jit(_rows_block)
    _store_block = triton.jit(_store_block)
    _few_rows_block = triton.jit(_few_rows_block)
    _block = triton.jit(_block)


@functools.cache
def _jit(interpret: bool):
    """The kernel; ``interpret`` only keys the cache, triton.jit reads TRITON_INTERPRET."""
    return triton.jit(_matvec_kernel)


def serves(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None, counters: int = 0
) -> bool:
    """Whether ``matvec`` runs its kernel for these operands (else ``F.linear`` per weight): x of one
    row (bf16, fp16 or fp32) or up to ``FEW_ROWS`` (bf16 or fp16, at most ``FEW_ROWS_MAX_K``
    columns unless the launch splits them, with ``counters`` zeroed counters at hand; up to
    ``MANY_ROWS`` for a launch of at most two programs per SM) on a GPU, contiguous rows of one
    dtype and device, biases for all weights or none."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    if triton is None or not x.is_cuda or x.dim() == 0 or not 1 <= len(weights) <= 3:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if rows == 1 else (torch.bfloat16, torch.float16)
    if not 1 <= rows <= MANY_ROWS or x.dtype not in dtypes or len(biases) != len(weights):
        return False
    same = [(w.dtype, w.device) == (x.dtype, x.device) for w in weights]
    rows_ok = [w.dim() == 2 and w.stride(-1) == 1 and w.shape[1] == x.shape[-1] for w in weights]
    if not all(same) or not all(rows_ok):
        return False
    sizes = [w.shape[0] for w in weights]
    if rows > 1 and x.shape[-1] > FEW_ROWS_MAX_K and not _splits(rows, sizes, x.device, counters):
        return False
    if rows > FEW_ROWS:  # a wide launch loses to cuBLAS
        programs = sum(triton.cdiv(n, MANY_ROWS_TILE.block_n) for n in sizes)
        if programs > 2 * sm_count(x.device):
            return False
    if all(b is None for b in biases):
        return True
    return all(
        b is not None and b.dim() == 1 and b.shape[0] == w.shape[0] and b.stride(0) == 1
        and (b.dtype, b.device) == (x.dtype, x.device)
        for w, b in zip(weights, biases, strict=True)
    )  # fmt: skip


def matvec(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    tile: Tile | None = None,
    counters: Tensor | None = None,
) -> list[Tensor]:
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]`` for x of one row or a few (see the
    module docstring); ``tile`` overrides the fixed configuration (the benchmark's sweep);
    ``counters`` (int32 zeros, left zero) let a launch split its columns (``FEW_ROWS_SPLIT_K``)."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    if not serves(x, weights, biases, 0 if counters is None else counters.numel()):
        return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    with torch.cuda.device(x.device):  # Triton launches on the current device
        return launch(x, weights, biases, tile, counters)


def launch(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    tile: Tile | None = None,
    counters: Tensor | None = None,
) -> list[Tensor]:
    """The kernel itself, for operands ``serves`` accepts (and, in tests, Triton's CPU interpreter).
    A tile with ``split_k > 1`` needs ``counters``: int32 zeros, one per block of weight rows, which
    the launch leaves zero."""
    k = x.shape[-1]
    rows = x.numel() // k
    mat = x.reshape(rows, k)
    if mat.stride(-1) != 1 or (rows > 1 and mat.stride(0) < k):
        mat = mat.contiguous()
    sizes = [w.shape[0] for w in weights]
    held = 0 if counters is None else counters.numel()
    tile = tile or tile_for(k, rows, sizes, x.device if x.is_cuda else None, held)
    blocks = [triton.cdiv(n, tile.block_n) for n in sizes]
    if tile.split_k > 1 and (rows == 1 or held < sum(blocks) or counters.dtype != torch.int32):
        raise ValueError(
            f"tile.split_k={tile.split_k} needs more than one row and int32 counters for the "
            f"{sum(blocks)} blocks, got {rows} row(s) and {held} {getattr(counters, 'dtype', '')} counters"
        )
    outs = [torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device) for n in sizes]
    pad = 3 - len(weights)  # unused slots repeat the first weight; no program reaches them
    ws, ys = list(weights) + [weights[0]] * pad, outs + [outs[0]] * pad
    has_bias = biases[0] is not None
    block_m = 1 if rows == 1 else max(16, triton.next_power_of_2(rows))  # tl.dot's least M is 16
    bs = [b if b is not None else ys[0] for b in biases] + [ys[0]] * pad  # not read without bias
    # The parts' partial sums [split_k, rows, sum(sizes)] in fp32 (not read unsplit).
    part = mat.new_empty(tile.split_k, rows, sum(sizes), dtype=torch.float32) if tile.split_k > 1 else ys[0]
    pdl = launches_early(x.device)
    early = {"launch_pdl": True} if pdl else {}
    _jit(triton.knobs.runtime.interpret)[(sum(blocks) * tile.split_k,)](
        mat, *ws, *bs, *ys, part, ys[0] if counters is None else counters, rows, *(sizes + [0] * pad), k,
        mat.stride(0), *(w.stride(0) for w in ws), blocks[0], sum(blocks[:2]), HAS_BIAS=has_bias,
        BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=k % (tile.block_k * tile.split_k) == 0, SPLIT_K=tile.split_k, PDL=pdl,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **early,
    )  # fmt: skip
    return outs


# An opaque op to torch.compile (as the decode attention): the launch stays out of the traced graph
# and the CUDA graph captures it like any other kernel. ``counters`` is scratch the kernel leaves as
# it found it (zeros), hence declared unmutated.
@torch.library.custom_op("kvpress_like::matvec", mutates_args=())
def matvec_op(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], counters: Tensor | None
) -> list[Tensor]:
    """``matvec`` with ``biases`` empty for none."""
    return matvec(x, weights, biases or None, counters=counters)


@matvec_op.register_fake
def _(x, weights, biases, counters):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]
