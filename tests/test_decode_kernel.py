"""The split-K decode-attention kernel against the plain-PyTorch reference, and the reference against
an independent per-(row, head) loop; the matrix-product kernels of decode (one row, a few rows)
against ``F.linear``.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before the
kernels are built; ``_interpreter_fixes`` holds two interpreter workarounds). Without triton (CPU builds
of torch do not ship it) the kernel tests are skipped and the reference tests still run. The interpreter
cannot do bf16 ``tl.dot``, so kernel tests use fp32 (tight tolerance) and one fp16 case; bf16 is checked
by ``benchmarks/decode_kernel.py`` on the GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # find the package without importing it: TRITON_INTERPRET must be set before the kernels are built
    HAS_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):
    HAS_TRITON = False
if HAS_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvpress_like.kernels import decode_attention, decode_attention_reference, matvec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULE_PATH = Path(__file__).parents[1] / "kvpress_like" / "kernels" / "decode_attention.py"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (CPU torch builds lack it): kernel tests need it"
)
FAST = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def _interpreter_fixes():
    """Two workarounds, in interpreter runs only, for problems outside this project:

    - triton's standard functions (``tl.zeros``, ``tl.sum``...) are interpretable only when
      ``TRITON_INTERPRET`` was set before triton was first imported; conftest's transformers imports
      pull triton in (through torch) before this module runs, so run them interpreted here.
    - Triton 3.6's interpreter turns tensor loop bounds into ints with ``int(array)``, which numpy >= 2.4
      rejects for 1-element arrays (triton-lang/triton#9171, fixed upstream by #9172).
    """
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    original = interp._patch_lang_tensor
    interpreted = {}

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    def call_interpreted(self, *args, **kwargs):
        if self.fn not in interpreted:
            interpreted[self.fn] = interp.InterpretedFunction(self.fn)
        return interpreted[self.fn](*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interp, "_patch_lang_tensor", patch_lang_tensor)
        mp.setattr(JITFunction, "__call__", call_interpreted)
        yield


def make_inputs(seed, b, hkv, g, cap, d, dtype=torch.float32, window=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, d, generator=gen)
    k = torch.randn(b, hkv, cap, d, generator=gen)
    v = torch.randn(b, hkv, cap, d, generator=gen)
    lengths = torch.randint(0, cap + 1, (b, hkv), generator=gen)
    pick = torch.rand(b, hkv, generator=gen)
    lengths = torch.where(pick < 0.2, 0, torch.where(pick > 0.8, cap, lengths))  # the edges, often
    extra = {}
    if window:  # strictly increasing positions per (row, head), with gaps as a compressed cache has
        kpos = torch.randint(1, 4, (b, hkv, cap), generator=gen).cumsum(-1)
        qpos = kpos.amax((1, 2)) + torch.randint(0, 2 * cap, (b,), generator=gen)
        extra = dict(key_positions=kpos, query_positions=qpos)
    out = [t.to(dtype) for t in (q, k, v)] + [lengths]
    return [t.to(DEVICE) for t in out], {n: t.to(DEVICE) for n, t in extra.items()}


def naive(query, keys, values, lengths, scale, key_positions=None, query_positions=None, sliding_window=None):
    """One (row, query head) at a time, in float64, over an explicit list of visible slots."""
    b, hq, d = query.shape
    group = hq // keys.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            kv = h // group
            slots = [
                n
                for n in range(min(int(lengths[i, kv]), keys.shape[2]))
                if sliding_window is None
                or int(query_positions[i]) - int(key_positions[i, kv, n]) < sliding_window
            ]
            if not slots:
                continue
            logits = [float(query[i, h].double() @ keys[i, kv, n].double()) * scale for n in slots]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            for w, n in zip(weights, slots, strict=True):
                out[i, h] += w / sum(weights) * values[i, kv, n].double()
    return out


shapes = dict(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 4),
    hkv=st.integers(1, 4),
    g=st.integers(1, 4),
    cap=st.integers(1, 300),
    d=st.sampled_from([16, 64]),
)


# ---------------------------------------------------------------- reference (runs without triton)


@FAST
@given(**{**shapes, "cap": st.integers(1, 40)}, window=st.booleans(), size=st.integers(1, 80))
def test_reference_matches_naive_loop(seed, b, hkv, g, cap, d, window, size):
    (q, k, v, lengths), extra = make_inputs(seed, b, hkv, g, cap, d, window=window)
    args = (q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), d**-0.5)
    extra = {n: t.cpu() for n, t in extra.items()} | ({"sliding_window": size} if window else {})
    out = decode_attention_reference(*args, **extra)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.double(), naive(*args, **extra), atol=1e-5, rtol=1e-5)


def test_reference_without_visible_keys_is_zero():
    (q, k, v, _), _ = make_inputs(0, 2, 2, 2, 8, 16)
    out = decode_attention_reference(q, k, v, torch.zeros(2, 2, dtype=torch.long, device=DEVICE), 0.25)
    assert torch.equal(out, torch.zeros_like(out))


def test_module_imports_and_falls_back_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("_decode_attention_without_triton", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    (q, k, v, lengths), _ = make_inputs(1, 2, 2, 2, 20, 16)
    args = (q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), 0.25)
    torch.testing.assert_close(module.decode_attention(*args), decode_attention_reference(*args))


# ---------------------------------------------------------------- the Triton kernel


def _arrivals(merge_here: bool, b: int, hkv: int) -> dict:
    """The kernel's ``arrivals`` argument: zeros when the split kernel merges, else absent."""
    return {"arrivals": torch.zeros(b * hkv, dtype=torch.int32, device=DEVICE)} if merge_here else {}


@needs_triton
@FAST
@given(**shapes, num_splits=st.sampled_from([None, 1, 2, 3, 7]), merge_here=st.booleans())
def test_kernel_matches_reference(seed, b, hkv, g, cap, d, num_splits, merge_here):
    (q, k, v, lengths), _ = make_inputs(seed, b, hkv, g, cap, d)
    extra = _arrivals(merge_here, b, hkv)
    for _ in range(2):  # the second call reuses the arrival counters the first one left behind
        out = decode_attention(q, k, v, lengths.int(), d**-0.5, num_splits=num_splits, **extra)
        ref = decode_attention_reference(q, k, v, lengths, d**-0.5)
        assert out.dtype == q.dtype and not out.isnan().any()
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        if merge_here:
            assert not extra["arrivals"].any()


@needs_triton
@pytest.mark.parametrize(
    ("g", "num_splits", "cap"), [(4, 40, 640), (3, 17, 544), (1, 64, 1024), (4, 40, 300)]
)
def test_merging_in_the_last_split_over_several_chunks_of_splits(g, num_splits, cap):
    """At D=128 the last split merges its G heads' partials a chunk of splits at a time (``MERGE_CHUNK``):
    several chunks, a ragged last one, G not a power of two; full rows hold entries in every split
    (16-32 slots each), the last case's rows leave the later splits empty."""
    (q, k, v, lengths), _ = make_inputs(11, 2, 2, g, cap, 128)
    lengths[0, 0] = cap
    arrivals = torch.zeros(2 * 2, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, lengths.int(), 0.09, num_splits=num_splits, arrivals=arrivals)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths, 0.09), atol=2e-5, rtol=1e-5)
    assert not arrivals.any()


@needs_triton
@FAST
@given(**shapes, num_splits=st.sampled_from([None, 2, 5]), size=st.integers(1, 600), merge_here=st.booleans())
def test_kernel_sliding_window(seed, b, hkv, g, cap, d, num_splits, size, merge_here):
    (q, k, v, lengths), pos = make_inputs(seed, b, hkv, g, cap, d, window=True)
    extra = _arrivals(merge_here, b, hkv)
    out = decode_attention(q, k, v, lengths, 0.3, **pos, sliding_window=size, num_splits=num_splits, **extra)
    ref = decode_attention_reference(q, k, v, lengths, 0.3, **pos, sliding_window=size)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@needs_triton
@FAST
@given(**shapes, num_splits=st.sampled_from([None, 3]))
def test_kernel_non_contiguous_inputs(seed, b, hkv, g, cap, d, num_splits):
    """Slices of larger buffers, a [B, C, Hkv, D] layout, lengths transposed, positions broadcast."""
    (q, k, v, lengths), pos = make_inputs(seed, b, hkv, g, cap, d, window=True)
    q_buf = torch.zeros(b, hkv * g, 3, d, device=DEVICE)
    q_buf[:, :, 1] = q
    k_buf = torch.zeros(b, 2 * hkv, cap + 5, d, device=DEVICE)
    k_buf[:, ::2, 2 : 2 + cap] = k
    v_buf = v.transpose(1, 2).contiguous()  # [B, C, Hkv, D]
    len_buf = lengths.t().contiguous()
    kpos = pos["key_positions"][:, :1].expand(-1, hkv, -1)  # same positions for every head: stride 0
    views = (q_buf[:, :, 1], k_buf[:, ::2, 2 : 2 + cap], v_buf.transpose(1, 2), len_buf.t())
    window = dict(key_positions=kpos, query_positions=pos["query_positions"], sliding_window=cap // 2 + 1)
    out = decode_attention(*views, 0.2, **window, num_splits=num_splits)
    ref = decode_attention_reference(q, k, v, lengths, 0.2, **window)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@needs_triton
def test_kernel_does_not_fall_back(monkeypatch):
    """Guards the tests above against comparing the reference with itself (the CPU fallback)."""
    module = importlib.import_module("kvpress_like.kernels.decode_attention")

    def fallback(*args, **kwargs):
        raise AssertionError("decode_attention fell back to the reference")

    monkeypatch.setattr(module, "decode_attention_reference", fallback)
    (q, k, v, lengths), _ = make_inputs(2, 1, 2, 2, 40, 16)
    module.decode_attention(q, k, v, lengths, 0.25)


@needs_triton
def test_kernel_without_visible_keys_gives_zeros():
    (q, k, v, lengths), pos = make_inputs(3, 2, 2, 3, 150, 16, window=True)
    zero = decode_attention(q, k, v, torch.zeros_like(lengths), 0.25, num_splits=3)
    assert torch.equal(zero, torch.zeros_like(zero))
    far = pos["query_positions"] + 10_000  # every key is outside the window
    out = decode_attention(q, k, v, lengths, 0.25, pos["key_positions"], far, 64, num_splits=3)
    assert torch.equal(out, torch.zeros_like(out))


@needs_triton
def test_kernel_half_precision():
    (q, k, v, lengths), _ = make_inputs(4, 2, 2, 4, 200, 64, dtype=torch.float16)
    out = decode_attention(q, k, v, lengths, 0.125, num_splits=2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths, 0.125), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("capacity", "programs", "splits", "why"),
    [
        (14336, 8, 49, "128K x1 (8 KV heads): 392 programs, one wave of 396; session 11 launched 448"),
        (13312, 8, 49, "the same in a 256-slot bucket"),
        (3584, 8, 14, "32K x1: capped at one split per 256 slots of capacity"),
        (3584, 64, 6, "32K x8: 384 programs in one wave (the sweep's best, against 8)"),
        (3584, 128, 3, "32K x16: 384 programs in one wave (the sweep's best, against 5)"),
        (3584, 256, 2, "32K x32: at most four programs per SM (three splits took 125.5 us, two 103.3)"),
        (3584, 512, 1, "32K x64: the launch fills the GPU without splits"),
        (3584, 1024, 1, "32K x128: the launch fills the GPU without splits"),
        (200, 8, 1, "a short cache: no split under 256 slots"),
    ],
)
def test_the_split_count_fills_whole_waves_of_an_h200(capacity, programs, splits, why):
    """Split counts on an H200 (132 SMs, three programs each) for the decode shapes of the 8B
    model, as docs/performance.md measured them; ``programs`` is rows x KV heads."""
    attention = sys.modules["kvpress_like.kernels.decode_attention"]
    assert attention._split_count(capacity, programs, 132) == splits, why


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("num_splits", "early"), [(None, False), (64, False), (None, True), (64, True)])
def test_kernel_merging_in_its_last_split_under_cuda_graph_replays(num_splits, early, monkeypatch):
    """Many splits racing for the arrival counter, replayed from one graph whose first kernels write
    the query and the lengths; ``early``: launched with programmatic dependent launch, the kernel
    must still read what those kernels wrote."""
    attention = sys.modules["kvpress_like.kernels.decode_attention"]
    monkeypatch.setattr(attention, "PROGRAMMATIC_LAUNCH", early)
    assert attention.launches_early(torch.device("cuda")) == (
        early and torch.cuda.get_device_capability()[0] >= 9
    )
    (q, k, v, lengths), _ = make_inputs(7, 4, 8, 4, 4096, 128, dtype=torch.bfloat16)
    q_in, lengths_in = q.clone(), lengths.clone()
    arrivals = torch.zeros(4 * 8, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels before capture
        decode_attention(q, k, v, lengths, 0.1, num_splits=num_splits, arrivals=arrivals)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q.copy_(q_in)
        lengths.copy_(lengths_in)
        out = decode_attention(q, k, v, lengths, 0.1, num_splits=num_splits, arrivals=arrivals)
    for seed in range(20):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q_in.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
        lengths_in.copy_(torch.randint(0, 4097, lengths.shape, generator=gen, device="cuda"))
        graph.replay()
        ref = decode_attention_reference(q_in.float(), k, v, lengths_in, 0.1)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        assert not arrivals.any()


@needs_triton
@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 700),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    bias=st.booleans(),
    block=st.sampled_from([(1, 128), (4, 256), (8, 64)]),
    seed=st.integers(0, 1000),
)
def test_the_one_row_kernel_matches_linear_in_float64(k, sizes, bias, block, seed):
    """kernels/matvec.py: one launch over one to three weights, with or without biases, ragged K
    and N (masked tails), fp32 (the interpreter's dtype here; bf16 runs in tests/test_gpu.py)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, k, generator=gen).to(DEVICE)
    weights = [torch.randn(n, k, generator=gen).to(DEVICE) for n in sizes]
    biases = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes] if bias else None
    tile = matvec.Tile(block[0], block[1], 4, 1)
    _assert_launch_matches_linear(x, weights, biases, tile, rtol=1e-5, atol=1e-4 * k**0.5)


def _assert_launch_matches_linear(x, weights, biases, tile, rtol: float, atol: float) -> None:
    """``matvec.launch`` against ``F.linear`` in float64, weight by weight (shape and dtype too). A
    tile split over the columns gets counters, which it must leave zero, and a second launch on
    them must give the same result to the bit."""
    counters = torch.zeros(sum(-(-w.shape[0] // tile.block_n) for w in weights), dtype=torch.int32,
                           device=DEVICE) if tile is not None and tile.split_k > 1 else None  # fmt: skip
    outs = matvec.launch(x, weights, biases or [None] * len(weights), tile, counters)
    for i, (out, w) in enumerate(zip(outs, weights, strict=True)):
        ref = F.linear(x.double(), w.double(), None if biases is None else biases[i].double())
        assert out.shape == ref.shape and out.dtype == x.dtype
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=rtol, atol=atol)
    if counters is not None:
        assert not counters.any()
        again = matvec.launch(x, weights, biases or [None] * len(weights), tile, counters)
        assert all(torch.equal(a, b) for a, b in zip(outs, again, strict=True))


@needs_triton
@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(2, matvec.MANY_ROWS),
    k=st.integers(1, 300),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    bias=st.booleans(),
    block=st.sampled_from([(16, 16), (16, 64), (32, 128), None]),  # None: the library's tile
    sliced=st.booleans(),
    split_k=st.sampled_from([1, 2, 3, 5]),
    seed=st.integers(0, 1000),
)
def test_the_few_rows_kernel_matches_linear_in_float64(rows, k, sizes, bias, block, sliced, split_k, seed):
    """kernels/matvec.py on 2 to MANY_ROWS rows (a small decode batch, tensor-core path): ragged K and N,
    padded batch rows, rows apart in memory (the last token of each row of a longer tensor), fp16
    operands as on the GPU; with ``split_k``, each block of weight rows in that many programs over
    parts of the columns (parts with no columns when K is short), added up by the last to finish."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3 if sliced else 1, k, generator=gen).half().to(DEVICE)[:, -1:]
    weights = [(torch.randn(n, k, generator=gen) / k**0.5).half().to(DEVICE) for n in sizes]
    biases = [torch.randn(n, generator=gen).half().to(DEVICE) for n in sizes] if bias else None
    tile = matvec.Tile(block[0], block[1], 4, 1, split_k) if block else None
    _assert_launch_matches_linear(x, weights, biases, tile, rtol=2e-3, atol=2e-3)


@needs_triton
def test_a_split_launch_without_counters_is_refused():
    x = torch.randn(2, 1, 64).half().to(DEVICE)
    weights = [torch.randn(32, 64).half().to(DEVICE)]
    with pytest.raises(
        ValueError, match="split_k=2 needs more than one row and int32 counters for the 2 blocks"
    ):
        matvec.launch(x, weights, [None], matvec.Tile(16, 16, 4, 1, split_k=2))
