"""GPU properties (run on the H200; skipped without CUDA): keep-everything equals the full cache,
the compiled decode equals eager decoding of the same compressed cache, a warmed-up bucket never
recompiles or re-captures, and an installed flash-attn serves prefill."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvpress_like import pipeline

from conftest import TINY_FASTKV, random_rows, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SLOW_SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))


def _gpu_model(family: str, dtype: torch.dtype):
    return tiny_model(family).to("cuda", dtype)


def _attention_kernels():
    """The module kernels/decode_attention.py (the package's attribute of that name is its function)."""
    return importlib.import_module("kvpress_like.kernels.decode_attention")


@SLOW_SETTINGS
@given(
    family=st.sampled_from(["llama", "qwen3", "gemma3"]),
    lengths=st.lists(st.integers(16, 300), min_size=1, max_size=4),
    seed=st.integers(0, 100),
    prefill=st.sampled_from(["eager", "compiled"]),
)
def test_keep_everything_matches_generate_on_gpu(family, lengths, seed, prefill):
    rows = random_rows(lengths, seed)
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device="cuda")
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device="cuda")
    keep_all = dict(
        tsp_rate=1.0, retain_rate=1.0, window=4, max_new_tokens=6, stop_on_eos=False, prefill=prefill
    )

    fp32 = _gpu_model(family, torch.float32)  # tokens: exact in fp32
    expected = fp32.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    out = pipeline(fp32, "fastkv", **keep_all)(rows)
    assert out.token_ids == expected[:, width:].tolist()

    # Logits in bf16: no further from the fp32 truth than transformers' own bf16 run is.
    with torch.no_grad():
        truth = fp32(ids, attention_mask=mask).logits[:, -1]
        bf16 = fp32.to(torch.bfloat16)
        theirs = bf16(ids, attention_mask=mask).logits[:, -1].float()
    ours = pipeline(bf16, "fastkv", **keep_all).compress(rows).last_logits
    their_error = (theirs - truth).abs().max().item()
    assert (ours - truth).abs().max().item() <= 2 * their_error + 1e-3


@SLOW_SETTINGS
@example(family="llama", length=161, batch=2, chunk=32, seed=0)  # a last chunk of one token
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    length=st.integers(40, 400),
    batch=st.integers(1, 3),
    chunk=st.integers(8, 39),  # below every length: the full-attention layers run in chunks
    seed=st.integers(0, 100),
)
def test_chunked_prefill_on_cudnn_matches_the_full_model(family, length, batch, chunk, seed):
    """Chunks attend through cuDNN with log-sum-exps (bf16): the last logits stay as close to the
    fp32 truth as transformers' own bf16 run is."""
    rows = random_rows([length] * batch, seed)
    ids = torch.tensor(rows, device="cuda")
    fp32 = _gpu_model(family, torch.float32)
    with torch.no_grad():
        truth = fp32(ids).logits[:, -1]
        bf16 = fp32.to(torch.bfloat16)
        theirs = bf16(ids).logits[:, -1].float()
    keep_all = dict(tsp_rate=1.0, retain_rate=1.0, window=4, prefill_chunk=chunk)
    ours = pipeline(bf16, "fastkv", **keep_all).compress(rows).last_logits
    assert (ours - truth).abs().max().item() <= 2 * (theirs - truth).abs().max().item() + 1e-3


@SLOW_SETTINGS
@given(
    lengths=st.lists(st.integers(40, 400), min_size=1, max_size=8),
    seed=st.integers(0, 100),
)
def test_compiled_decode_equals_eager_decode_of_the_same_cache(lengths, seed):
    model = _gpu_model("llama", torch.float32)
    pipe = pipeline(model, "fastkv", max_new_tokens=8, stop_on_eos=False, **TINY_FASTKV)
    context = pipe.compress(random_rows(lengths, seed))
    eager = pipe.generate(context=context, decode="eager").token_ids
    assert pipe.generate(context=context, decode="compiled").token_ids == eager
    assert pipe.generate(context=context, decode="static").token_ids == eager


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_a_warm_bucket_never_recompiles_or_recaptures(monkeypatch, batch):
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    recordings = []
    original = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        recordings.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    model = _gpu_model("llama", torch.bfloat16)
    pipe = pipeline(model, "fastkv", max_new_tokens=32, stop_on_eos=False, decode="compiled", **TINY_FASTKV)
    first, second = random_rows([300, 280] * 4, seed=1)[:batch], random_rows([320, 200] * 4, seed=2)[:batch]
    pipe(first)  # warm-up: compile and capture this (batch, bucket)
    graphs, captures = counters["stats"]["unique_graphs"], len(recordings)
    out = pipe(first)  # more steps
    pipe(second)  # another prompt in the same bucket
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(recordings) == captures
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(out.stats.decode_step_seconds) == 31


def test_symbolic_capacity_reuses_the_compiled_step_in_a_new_bucket(monkeypatch, fresh_dynamo):
    """A new bucket is captured anew (its buffers are new) but not compiled again, and decodes
    like the eager loop over the same compressed cache."""
    from torch._dynamo.utils import counters

    from kvpress_like import decode
    from kvpress_like.decode import BUCKET

    monkeypatch.setattr(decode, "SYMBOLIC_CAPACITY", True)
    model = _gpu_model("llama", torch.float32)  # tokens: exact in fp32
    pipe = pipeline(model, "full", max_new_tokens=8, stop_on_eos=False, decode="compiled")
    pipe(random_rows([300], seed=1))
    graphs = counters["stats"]["unique_graphs"]
    context = pipe.compress(random_rows([BUCKET + 300], seed=2))
    eager = pipe.generate(context=context, decode="eager").token_ids
    assert pipe.generate(context=context, decode="compiled").token_ids == eager
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(pipe._decoders.decoders) == 2  # two buckets


def test_compiled_decode_stops_at_eos_without_a_sync_per_step():
    """The EOS flag is read one step late on CUDA: same tokens, at most one extra (discarded) step."""
    model = _gpu_model("llama", torch.float32)
    rows = random_rows([120], seed=4)
    pipe = pipeline(model, "fastkv", max_new_tokens=12, decode="compiled", **TINY_FASTKV)
    free = pipe(rows, stop_on_eos=False).ids
    eos = free[2]
    model.generation_config.eos_token_id = eos
    out = pipe(rows)
    assert out.ids == free[: free.index(eos) + 1]
    assert out.stats.new_tokens == (len(out.ids),)
    # The token at index i needs i steps; the late flag may add one, never more.
    assert len(out.ids) - 1 <= len(out.stats.decode_step_seconds) <= len(out.ids)


def test_closing_a_compiled_pipeline_gives_its_decode_buffers_back(fresh_dynamo):
    """After ``close`` the CUDA memory a compiled decode's static buffers held is free again, at
    once: allocated memory drops by at least the buffers' bytes with Python's cycle collector off
    (the compile's leftovers refer to the buffers; session 12's 32K x128 run held a closed
    decoder's 16 GiB through the next prefill). Batch 16 of 1,000 kept tokens, so that the buffers
    outweigh the step's own memory."""
    import gc

    from kvpress_like.decode import decoder_bytes

    model = _gpu_model("llama", torch.bfloat16)
    pipe = pipeline(model, "full", max_new_tokens=4, stop_on_eos=False, decode="compiled")
    pipe(random_rows([1000] * 16, seed=5))
    held = sum(decoder_bytes(pipe.adapter, *key[:2]) for key in pipe._decoders.decoders)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gc.disable()
    try:
        pipe.close()
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
    finally:
        gc.enable()
    assert before - after >= held, (before, after, held)


FLASH_CONTRACT = '''
import torch

calls = []


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kwargs):
    """flash-attn's documented contract in plain PyTorch: [B, T, H, D] in and out, fewer KV heads
    shared by groups of query heads, causal aligned to the bottom right."""
    calls.append(q.shape)
    b, t, h, d = q.shape
    k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale
    if causal:
        keep = torch.ones(t, k.shape[1], dtype=torch.bool, device=q.device).tril(k.shape[1] - t)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)
'''


def test_installed_flash_attn_serves_prefill(tmp_path, monkeypatch):
    """With a flash-attn for this GPU importable, the fast causal prefill goes through it, in its
    [B, T, H, D] layout, and gives what SDPA gives."""
    from kvpress_like import flash

    model = _gpu_model("llama", torch.bfloat16)
    rows = random_rows([200], seed=3)
    keep_all = dict(tsp_rate=1.0, retain_rate=1.0, window=4)  # no selection for rounding to flip
    pipe = pipeline(model, "fastkv", **keep_all)
    expected = pipe.compress(rows).last_logits

    major = torch.cuda.get_device_capability()[0]
    name = next((m for m, low, high in flash.CANDIDATES if low <= major <= high), None)
    if name is None:
        pytest.skip(f"no flash-attn generation is used on compute capability {major}")
    (tmp_path / f"{name}.py").write_text(FLASH_CONTRACT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    flash.causal_kernel.cache_clear()
    try:
        got = pipe.compress(rows).last_logits
        calls = sys.modules[name].calls
    finally:
        flash.causal_kernel.cache_clear()
    # Every layer's fresh causal attention but the propagation layer's, whose propagated queries
    # attend alone on the log-sum-exp kernel (prefill_attention.selected_causal_attention).
    assert len(calls) == model.config.num_hidden_layers - 1
    # bf16 roundings differ between the two; a wrong layout, head grouping or mask would not be close.
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


def test_compiled_decode_grows_its_buffers_and_matches_eager(monkeypatch, fresh_dynamo):
    """Buckets of 64 slots: a 100-token prompt asking for 150 tokens starts at 192 slots and moves
    to 256 midway; the compiled step (symbolic capacity) gives the eager loop's tokens."""
    from kvpress_like import decode

    monkeypatch.setattr(decode, "BUCKET", 64)
    monkeypatch.setattr(decode, "NEW_SLOTS", 64)
    model = _gpu_model("llama", torch.float32)
    pipe = pipeline(model, "full", max_new_tokens=150, stop_on_eos=False)
    rows = random_rows([100], seed=6)
    assert pipe(rows, decode="compiled").token_ids == pipe(rows, decode="eager").token_ids
    assert [key[1] for key in pipe._decoders.decoders] == [192, 256]


def test_threads_share_one_compiled_pipeline_beside_model_generate():
    """Threads take turns on the compiled decoder (its lock) and get their own answers, while
    transformers' own generate runs on the same model in another thread."""
    from concurrent.futures import ThreadPoolExecutor

    model = _gpu_model("llama", torch.float32)
    pipe = pipeline(model, "fastkv", max_new_tokens=8, stop_on_eos=False, decode="compiled", **TINY_FASTKV)
    prompts = [random_rows([n], seed=n) for n in (120, 140, 160)]
    expected = [pipe(p).token_ids for p in prompts]
    plain_ids = torch.tensor(random_rows([50], seed=3), device="cuda")
    plain_expected = model.generate(plain_ids, max_new_tokens=6, do_sample=False).tolist()

    def plain():
        return model.generate(plain_ids, max_new_tokens=6, do_sample=False).tolist()

    with ThreadPoolExecutor(4) as workers:
        futures = [workers.submit(lambda p=p: [pipe(p).token_ids for _ in range(3)]) for p in prompts]
        plain_future = workers.submit(lambda: [plain() for _ in range(3)])
        results = [f.result() for f in futures]
    for want, got in zip(expected, results, strict=True):
        assert got == [want] * 3
    assert plain_future.result() == [plain_expected] * 3


@pytest.mark.parametrize("lengths", [[70], [90, 41]])
def test_a_saved_context_moves_between_cpu_and_gpu_and_continues_exactly(tmp_path, lengths):
    """Saved on the GPU, loaded on the CPU (and back): the tensors are the same, and compiled
    decoding from the loaded context gives the tokens of eager decoding from the original."""
    from kvpress_like import Context

    model = _gpu_model("llama", torch.float32)  # tokens: exact in fp32, as in the tests above
    pipe = pipeline(model, "fastkv", max_new_tokens=8, stop_on_eos=False, **TINY_FASTKV)
    context = pipe.compress(random_rows(lengths, seed=2))
    on_cpu = Context.load(context.save(tmp_path / "gpu.kvc"), pipe, device="cpu")
    assert on_cpu.last_logits.device.type == "cpu"
    assert torch.equal(on_cpu.last_logits, context.last_logits.cpu())
    back = Context.load(on_cpu.save(tmp_path / "cpu.kvc"), pipe)  # the pipeline's device: cuda
    eager = pipe.generate(context=context, decode="eager").token_ids
    assert pipe.generate(context=back, decode="compiled").token_ids == eager
    assert pipe.generate(context=on_cpu.to("cuda"), decode="static").token_ids == eager


def test_fp32_prefill_attention_on_cuda_stays_off_the_math_kernel():
    """fp32 grouped heads on CUDA: the same output as SDPA's math kernel, without its [B, Hq, T, T]
    score matrix (the memory-efficient kernel's peak is far below it)."""
    from kvpress_like.prefill_attention import causal_attention

    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(1, 9, 4096, 64, device="cuda", generator=gen)
    k, v = (torch.randn(1, 3, 4096, 64, device="cuda", generator=gen) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = causal_attention(q, k, v, 0.125)
    peak = torch.cuda.max_memory_allocated() - before
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), is_causal=True, scale=0.125, enable_gqa=True
        )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert peak < 9 * 4096 * 4096 * 4 / 8  # an eighth of the math kernel's score matrix


def test_an_eval_cell_gives_the_same_records_on_cpu_and_cuda_in_fp32(tmp_path, smollm2):
    """The accuracy harness on SmolLM2 in fp32: CUDA gives the CPU's records (same predictions,
    scores and kept entries; fidelity's KL within 1e-3)."""
    from kvpress_like.eval.harness import evaluate

    model, tokenizer = smollm2
    settings = dict(
        strategies=["full", "fastkv", "snapkv"],
        budgets=[0.2],
        tasks=["niah_single", "vt", "fidelity"],
        lengths=[1024],
        samples=3,
        batch=3,
        progress=False,
        plots=False,
        model_name="smollm2",
    )
    cpu = evaluate(model, tokenizer, out=tmp_path / "cpu", **settings)
    cuda = evaluate(model.to("cuda"), tokenizer, out=tmp_path / "cuda", **settings)
    model.to("cpu")  # the fixture's model, as it came
    assert [r["key"] for r in cuda.records] == [r["key"] for r in cpu.records]
    for here, there in zip(cpu.records, cuda.records, strict=True):
        assert there["status"] == here["status"] == "ok"
        for name in ("prediction", "score", "prompt_tokens", "kv_kept_mean"):
            assert there[name] == here[name], (here["key"], name)
        if here["task"] == "fidelity":
            assert there["kl"] == pytest.approx(here["kl"], abs=1e-3)


def test_new_batch_sizes_reuse_the_compiled_step_and_sampling_runs_inside_it(monkeypatch, fresh_dynamo):
    """On CUDA with CUDA graphs: batches 2, 4 and 8 share one compiled step (greedy) and decode as
    the eager loop does; seeded sampling inside the compiled step draws the eager loop's tokens."""
    from torch._dynamo.utils import counters

    from kvpress_like import decode

    monkeypatch.setattr(decode, "SYMBOLIC_BATCH", True)
    counters.clear()
    model = _gpu_model("llama", torch.float32)
    pipe = pipeline(model, "fastkv", **TINY_FASTKV, max_new_tokens=6, stop_on_eos=False, decode="compiled")
    prompts = random_rows([90, 61, 120, 77, 40, 99, 58, 83], seed=9)
    for batch in (2, 4, 8):
        assert pipe(prompts[:batch]).token_ids == pipe(prompts[:batch], decode="eager").token_ids
    assert counters["stats"]["unique_graphs"] == 1
    sample = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=3)
    assert pipe(prompts[:4], **sample).token_ids == pipe(prompts[:4], decode="eager", **sample).token_ids


def test_a_step_on_own_cuda_graphs_decodes_as_the_eager_loop(monkeypatch, fresh_dynamo):
    """The compiled step replayed from graph_step.py's graphs (a sharded model's path, here on one
    GPU): greedy, sampled and sampled with top-k/top-p, two calls in a row on the same decoder,
    give the eager loop's tokens."""
    from kvpress_like import decode

    monkeypatch.setattr(decode, "OWN_GRAPHS", "always")
    model = _gpu_model("llama", torch.float32)
    pipe = pipeline(model, "fastkv", **TINY_FASTKV, max_new_tokens=6, stop_on_eos=False, decode="compiled")
    prompts = random_rows([90, 61, 120, 77], seed=5)
    for asked in ({}, dict(do_sample=True, temperature=0.7, top_k=0, seed=1),  # top_k: 50 by default
                  dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=3)):  # fmt: skip
        for rows in (prompts[:2], prompts[2:]):
            assert pipe(rows, **asked).token_ids == pipe(rows, decode="eager", **asked).token_ids
    (decoder,) = pipe._decoders.decoders.values()
    assert isinstance(decoder.step, decode.GraphedStep) and len(decoder.step.graphs) == 3


@pytest.mark.parametrize(
    ("seq", "block", "picks"),
    [(300, 64, [0, 5, 64, 65, 130, 299]), (129, 64, [128]), (200, 1000, [*range(0, 200, 3), 199])],
)
def test_selected_causal_attention_on_cudnn_is_as_close_to_the_truth_as_the_causal_kernel(seq, block, picks):
    """bf16 through cuDNN (a last block of one key, a block with one selected query): the selected
    rows are no further from a float64 reference than the plain causal kernel's rows."""
    from kvpress_like.prefill_attention import causal_attention, selected_causal_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    like = dict(device="cuda", generator=gen, dtype=torch.bfloat16)
    query = torch.randn(2, 8, seq, 64, **like)
    keys, values = (torch.randn(2, 4, seq, 64, **like) for _ in "kv")
    selected = torch.zeros(2, seq, dtype=torch.bool, device="cuda")
    selected[0, picks], selected[1, seq - 1] = True, True
    out = selected_causal_attention(query, keys, values, 0.125, selected, block)
    truth = torch.nn.functional.scaled_dot_product_attention(
        query.double(), keys.double().repeat_interleave(2, 1), values.double().repeat_interleave(2, 1),
        is_causal=True, scale=0.125,
    )  # fmt: skip
    rows = selected[:, None, :, None].expand_as(out)
    causal = causal_attention(query, keys, values, 0.125)
    ours, theirs = ((t[rows].double() - truth[rows]).abs().max().item() for t in (out, causal))
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)
    assert not out[~rows].any()


@pytest.mark.parametrize(
    ("family", "early"), [("llama", False), ("qwen2", False), ("phi3", False), ("llama", True)]
)
def test_batch_one_steps_run_the_one_row_kernel_and_decode_as_the_eager_loop(
    family, early, monkeypatch, fresh_dynamo
):
    """Batch-1 static and compiled decode run their projections in kernels/matvec.py (q, k, v in one
    launch; qwen2 with biases; phi3's fused projections alone) and give the eager loop's tokens;
    ``early``: the library's kernels on programmatic dependent launch."""
    from kvpress_like.kernels import matvec

    monkeypatch.setattr(_attention_kernels(), "PROGRAMMATIC_LAUNCH", early)

    launches = {"static": 0, "compiled": 0}
    mode = "static"
    launch = matvec.launch

    def counted(*args, **kwargs):
        launches[mode] += 1
        return launch(*args, **kwargs)

    monkeypatch.setattr(matvec, "launch", counted)
    model = _gpu_model(family, torch.float32)
    pipe = pipeline(model, "fastkv", **TINY_FASTKV, max_new_tokens=8, stop_on_eos=False)
    for lengths in ([90], [150]):
        context = pipe.compress(random_rows(lengths, seed=4))
        eager = pipe.generate(context=context, decode="eager").token_ids
        for mode in ("static", "compiled"):
            assert pipe.generate(context=context, decode=mode).token_ids == eager
    # The kernel ran: every static step; the compiled step when it was captured (then replayed).
    assert launches["static"] > 0 and launches["compiled"] > 0, launches


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 32])
def test_the_projection_kernel_in_bf16_is_as_close_to_float64_as_cublas(rows):
    """The 8B shapes (q, k, v in one launch; gate and up; down) in bf16, for one row and for a few
    (the tensor-core path, which leaves the 14336-column down projection to cuBLAS, and above 16 rows
    also launches of more than two programs per SM): no further from a float64 product than cuBLAS's
    bf16 F.linear is (plus a bf16 rounding of the output)."""
    import torch.nn.functional as F

    from kvpress_like.kernels.matvec import matvec, serves

    # Which the kernel serves at 1 / 2-16 / 32 rows: q+k+v (192 weight blocks of 32 rows) and o
    # (128) always; gate+up (896 blocks, over two per SM of an H200) up to 16 rows; 14336 columns
    # (Llama's down projection) at one row only.
    served = {(4096, 1024, 1024): (True, True, True), (14336, 14336): (True, True, False),
              (4096,): (True, True, True)}  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    for sizes, k in (((4096, 1024, 1024), 4096), ((14336, 14336), 4096), ((4096,), 14336), ((4096,), 8192)):
        x = torch.randn(rows, 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5 for n in sizes
        ]
        expected = served[sizes][0 if rows == 1 else 1 if rows <= 16 else 2] and (rows == 1 or k <= 8192)
        assert serves(x, weights) == expected, (sizes, k, rows)
        for out, w in zip(matvec(x, weights), weights, strict=True):
            truth = x.double() @ w.double().T
            theirs = (F.linear(x, w).double() - truth).abs().max().item()
            ours = (out.double() - truth).abs().max().item()
            assert ours <= 2 * theirs + 1e-2, (sizes, ours, theirs)


@pytest.mark.parametrize("rows", [2, 8, 16])
def test_projections_split_over_their_columns_under_cuda_graph_replays(rows, monkeypatch):
    """Projections of the 8B model's columns (4096: o; 14336: down) with one block of 32 weight rows
    per SM (128 on an H200) and ``FEW_ROWS_SPLIT_K`` 4: the library picks the split (down joins the
    kernel past FEW_ROWS_MAX_K), and replays of one CUDA graph with new inputs stay as close to
    float64 as cuBLAS, the same to the bit as the launch outside the graph, the counters left zero."""
    import torch.nn.functional as F

    from kvpress_like.kernels import matvec

    monkeypatch.setattr(matvec, "FEW_ROWS_SPLIT_K", 4)
    sms = matvec.sm_count(torch.device("cuda"))
    counters = torch.zeros(sms, dtype=torch.int32, device="cuda")
    n = matvec.FEW_ROWS_TILE.block_n * sms
    gen = torch.Generator(device="cuda").manual_seed(1)
    for k in (4096, 14336):
        x = torch.randn(rows, 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5]
        assert matvec.serves(x, weights, counters=counters.numel())
        assert matvec.tile_for(k, rows, [n], x.device, counters.numel()).split_k == 4
        matvec.matvec(x, weights, counters=counters)  # compiles the kernel before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            (out,) = matvec.matvec(x, weights, counters=counters)
        for _ in range(5):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
            graph.replay()
            truth = x.double() @ weights[0].double().T
            theirs = (F.linear(x, weights[0]).double() - truth).abs().max().item()
            assert (out.double() - truth).abs().max().item() <= 2 * theirs + 1e-2
            assert torch.equal(out, matvec.matvec(x, weights, counters=counters)[0])
            assert not counters.any()


@pytest.mark.parametrize("rows", [1, 8])
def test_projections_launched_early_read_what_the_kernel_before_them_wrote(rows, monkeypatch):
    """With programmatic dependent launch the projection kernel starts streaming its weights while
    the kernel before it (here a copy that writes its input) still runs: in a CUDA graph replayed with
    new inputs it must give the launch outside any graph's result, to the bit (q+k+v of the 8B
    model; at 8 rows o also split over its columns)."""
    from kvpress_like.kernels import matvec

    monkeypatch.setattr(_attention_kernels(), "PROGRAMMATIC_LAUNCH", True)
    monkeypatch.setattr(matvec, "FEW_ROWS_SPLIT_K", 4)
    assert matvec.launches_early(torch.device("cuda"))
    sms = matvec.sm_count(torch.device("cuda"))
    counters = torch.zeros(sms, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(2)
    for sizes in ((4096, 1024, 1024), (matvec.FEW_ROWS_TILE.block_n * sms,)):
        x_in = torch.randn(rows, 1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
        weights = [
            torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) / 64 for n in sizes
        ]
        x = x_in.clone()
        matvec.matvec(x, weights, counters=counters)  # compiles the kernel before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.copy_(x_in)
            outs = matvec.matvec(x, weights, counters=counters)
        for _ in range(5):
            x_in.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
            graph.replay()
            for out, expected in zip(outs, matvec.matvec(x_in, weights, counters=counters), strict=True):
                assert torch.equal(out, expected)
            assert not counters.any()


@pytest.mark.parametrize(
    ("family", "split_k", "early"),
    [("llama", 1, False), ("qwen2", 1, False), ("llama", 4, False), ("llama", 4, True)],
)
def test_small_batches_run_the_few_rows_kernel_and_score_as_cublas_does(
    family, split_k, early, monkeypatch, fresh_dynamo
):
    """bf16 batches of 3 and 6, compiled (one step for both): the projections run in kernels/matvec.py
    (with ``split_k``, launches of at most one program per SM split over their columns; ``early``:
    the library's kernels on programmatic dependent launch) and every
    step's scores stay within bf16 tolerance of the same compiled step on cuBLAS, for as long as
    the two decodes pick the same tokens (the first step's scores at least)."""
    from kvpress_like import decode
    from kvpress_like.kernels import matvec

    monkeypatch.setattr(_attention_kernels(), "PROGRAMMATIC_LAUNCH", early)
    launches, launch = [], matvec.launch
    monkeypatch.setattr(matvec, "launch", lambda x, *a, **k: launches.append(len(x)) or launch(x, *a, **k))
    monkeypatch.setattr(matvec, "FEW_ROWS_SPLIT_K", split_k)
    if split_k > 1:  # 16-column tiles: the tiny models' 64-128 columns reach every part
        monkeypatch.setattr(matvec, "FEW_ROWS_TILE", dataclasses.replace(matvec.FEW_ROWS_TILE, block_k=16))
    tiles, tile_for = [], matvec.tile_for
    monkeypatch.setattr(matvec, "tile_for", lambda *a, **k: tiles.append(tile_for(*a, **k)) or tiles[-1])
    model = _gpu_model(family, torch.bfloat16)
    prompts = random_rows([90, 61, 120, 77, 40, 99], seed=11)
    runs = {}
    for kernel in (True, False):
        monkeypatch.setattr(decode, "PROJECTION_KERNELS", kernel)
        pipe = pipeline(model, "fastkv", **TINY_FASTKV, max_new_tokens=6, stop_on_eos=False)
        runs[kernel] = [pipe(prompts[:batch], decode="compiled", output_scores=True) for batch in (3, 6)]
    assert {3, 6} <= set(launches), launches
    assert {tile.split_k for tile in tiles if tile.block_n > 4} == {split_k}, tiles  # few-rows tiles
    for ours, theirs in zip(runs[True], runs[False], strict=True):
        compared = 0
        tokens = zip(torch.tensor(ours.token_ids).T, torch.tensor(theirs.token_ids).T, strict=True)
        for a, b, (token_a, token_b) in zip(ours.scores, theirs.scores, tokens, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
            compared += 1
            if not torch.equal(token_a, token_b):
                break  # the next scores follow different tokens
        assert compared >= 2  # the prefill's, then at least the first step's


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_decodes_there_as_the_eager_loop(fresh_dynamo):
    """Triton launches on the current device (cuda:0 here): the decode kernels must launch on the
    operands' device. Batch 1 (one-row kernel) and batch 2, static and compiled."""
    model = tiny_model("llama").to("cuda:1")
    pipe = pipeline(model, "fastkv", **TINY_FASTKV, max_new_tokens=6, stop_on_eos=False)
    for lengths in ([90], [90, 61]):
        context = pipe.compress(random_rows(lengths, seed=6))
        eager = pipe.generate(context=context, decode="eager").token_ids
        for mode in ("static", "compiled"):
            assert pipe.generate(context=context, decode=mode).token_ids == eager, (lengths, mode)
