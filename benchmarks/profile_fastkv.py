"""Where FastKV's time and memory go on one GPU: prefill kernels, per-layer memory peaks, decode kernels.

On the Llama-3.1-8B-shaped random model of ``speed.py``: one warm prefill under the profiler
(kernel time by name, wall time, GPU-busy fraction), the peak memory reached in each decoder layer,
and the decode step's kernels per step, in its CUDA graph as it runs (``graph_timeline``: kernels,
GPU-busy and span ms) and compiled without graphs (``decode_kernels``), each the difference of a
long and a two-token decode so that loading the buffers does not count. The span's difference
also carries the two decodes' different host gaps, and has come out below the busy time (32K x8 on
the H200): the busy time is the figure to read. Writes ``profile.json`` under ``--out``.

    python benchmarks/profile_fastkv.py --length 131072 --out results/profile
    python benchmarks/profile_fastkv.py --graph-only --length 32768 --batch 8 --prefill-rows 4 --out R
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import FASTKV, load_model

from kvpress_like import decode, pipeline

VARIANTS = ("library", "flip_merge", "flip_symbolic", "no_combo", "cublas_gemv")


def kernel_table(prof, top: int | None) -> tuple[list[dict], float]:
    """The ``top`` CUDA kernels by total time (all for None), and the total kernel milliseconds."""
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows) / 1e3
    table = [{"kernel": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count} for e in rows[:top]]
    return table, total


def timeline(prof) -> dict:
    """Kernels launched, GPU-busy ms (the union of kernel intervals), the span from the first
    kernel's start to the last one's end (span minus busy: the GPU between kernels) and, by kernel
    name, milliseconds and calls."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, reach = 0.0, float("-inf")
    for start, end in sorted((e.time_range.start, e.time_range.end) for e in events):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events) if events else 0.0
    table, _ = kernel_table(prof, top=None)
    names = {row["kernel"]: (row["ms"], row["calls"]) for row in table}
    return {"kernels": len(events), "busy_ms": busy / 1e3, "span_ms": span / 1e3, "names": names}


def profile_steps(pipe, context, steps: int, top: int = 40) -> dict:
    """Per decode step, as ``timeline`` gives them: the difference of a decode of ``steps + 2``
    tokens and one of 2, so that what a decode does once (loading its buffers) cancels out."""
    runs = []
    for new_tokens in (2, steps + 2):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe.generate(context=context, max_new_tokens=new_tokens)
        runs.append(timeline(prof))
    short, long = runs
    per_step = {key: (long[key] - short[key]) / steps for key in ("kernels", "busy_ms", "span_ms")}
    kernels = []
    for name, (ms, calls) in long["names"].items():
        once_ms, once_calls = short["names"].get(name, (0.0, 0))
        kernels.append({"kernel": name, "ms": (ms - once_ms) / steps, "calls": (calls - once_calls) / steps})
    kernels = sorted((k for k in kernels if k["calls"] > 0), key=lambda k: k["ms"], reverse=True)[:top]
    print({key: round(value, 3) for key, value in per_step.items()}, "per step")
    for row in kernels[:30]:
        print(f"  {row['ms']:8.4f} ms/step {row['calls']:6.1f}/step  {row['kernel']}")
    return {**per_step, "kernels": kernels}


def layer_memory(model, run) -> list[float]:
    """Peak GiB allocated while each decoder layer runs (forward hooks, this script only)."""
    peaks: list[float] = []

    def before(module, args, kwargs):
        torch.cuda.reset_peak_memory_stats()

    def after(module, args, kwargs, output):
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--prefill-rows", type=int, help="rows per prefill part (prefill_rows)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("results/profile"))
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--decode-only", action="store_true", help="skip the prefill profile and memory")
    only.add_argument("--prefill-only", action="store_true", help="skip the decode variants and kernels")
    only.add_argument(
        "--graph-only", action="store_true", help="only the library step's kernels in its CUDA graph"
    )
    only.add_argument(
        "--peak-tensors", action="store_true", help="only list what is allocated at the prefill's memory peak"
    )
    parser.add_argument(
        "--variants",
        default="library",
        help="decode variants to time, comma-separated: library, flip_merge (MERGE_IN_SPLIT_KERNEL flipped), "
        "flip_symbolic (SYMBOLIC_CAPACITY flipped), no_combo, cublas_gemv",
    )
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: {sorted(unknown)} not among {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"length": args.length, "batch": args.batch}

    model = load_model(tiny=False)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length), device="cuda")
    pipe = pipeline(
        model, "fastkv", max_new_tokens=args.steps + 1, stop_on_eos=False, prefill_rows=args.prefill_rows,
        **FASTKV,
    )  # fmt: skip
    context = pipe.compress(ids)  # warm-up
    torch.cuda.synchronize()
    if args.graph_only:
        pipe.generate(context=context, max_new_tokens=4)  # compiles and captures the step
        print("in the CUDA graph:")
        report["graph_timeline"] = profile_steps(pipe, context, args.steps)
    del context  # nothing held from the warm-up inflates the peaks below
    if args.peak_tensors:
        report["peak_tensors"] = peak_tensors(lambda: pipe.compress(ids))
    elif not (args.decode_only or args.graph_only):
        profile_prefill(model, pipe, ids, report)
    if not (args.prefill_only or args.graph_only or args.peak_tensors):
        profile_decode(pipe, ids, args.variants.split(","), args.steps, report)
    (args.out / "profile.json").write_text(json.dumps(report, indent=1))


def profile_prefill(model, pipe, ids, report: dict) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        context = pipe.compress(ids)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    table, busy = kernel_table(prof, 30)
    report["prefill"] = {"wall_s": wall, "kernel_s": busy / 1e3, "kernels": table}
    print(f"prefill {wall:.3f} s, kernels {busy / 1e3:.3f} s")
    for row in table[:20]:
        print(f"  {row['ms']:9.1f} ms {row['calls']:5d}  {row['kernel']}")

    del context  # nothing kept from the profiled call inflates the peaks below
    report["prefill_modes"] = compare_prefill_modes(model, ids)
    report["layer_peak_gib"] = layer_memory(model, lambda: pipe.compress(ids))
    print("peak GiB per layer:", [round(x, 2) for x in report["layer_peak_gib"]])
    torch.cuda.reset_peak_memory_stats()
    pipe.compress(ids)
    report["prefill_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"prefill peak {report['prefill_peak_gib']:.2f} GiB")


PREFILL_MODES = {  # "eager" and "compiled" run whole layers (prefill_chunk's default is 16384)
    "eager": {"prefill_chunk": None},
    "compiled": {"prefill": "compiled", "prefill_chunk": None},
    "eager, 16K chunks": {"prefill_chunk": 16384},
    "compiled, 16K chunks": {"prefill": "compiled", "prefill_chunk": 16384},
}


def compare_prefill_modes(model, ids) -> dict:
    """Seconds and peak GiB of a warm FastKV prefill in each of ``PREFILL_MODES``."""
    modes = {}
    for mode, settings in PREFILL_MODES.items():
        pipe = pipeline(model, "fastkv", **settings, **FASTKV)
        start = time.perf_counter()
        pipe.compress(ids)  # warm-up (compiles)
        first = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        seconds = pipe.compress(ids).stats.prefill_seconds
        modes[mode] = {
            "seconds": seconds,
            "first_call_s": first,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        peak = modes[mode]["peak_gib"]
        print(f"prefill {mode}: {seconds:.3f} s, peak {peak:.2f} GiB (first call {first:.1f} s)")
    return modes


def peak_tensors(run, top: int = 25) -> dict:
    """The allocations alive at the memory peak of ``run`` (beyond what was allocated before), each
    named by the innermost transformers/kvpress_like source line that made it."""
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        run()
        torch.cuda.synchronize()
        events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)

    def replay(until: int) -> tuple[dict[int, dict], int, int]:
        """Allocations alive after event ``until``; the peak total and the event reaching it."""
        live: dict[int, dict] = {}
        total = peak = peak_at = 0
        for index, event in enumerate(events[: until + 1]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > peak:
                    peak, peak_at = total, index
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
        return live, peak, peak_at

    _, peak, peak_at = replay(len(events) - 1)
    at_peak, _, _ = replay(peak_at)

    def origin(event: dict) -> str:  # frames run innermost first
        for frame in event.get("frames", []):
            if any(part in frame["filename"] for part in ("/transformers/", "/kvpress_like/")):
                return f"{frame['filename'].split('/')[-1]}:{frame['line']} {frame['name']}"
        return "?"

    rows = sorted(at_peak.values(), key=lambda e: e["size"], reverse=True)[:top]
    table = [{"gib": e["size"] / 2**30, "origin": origin(e)} for e in rows]
    print(f"peak {peak / 2**30:.2f} GiB above the start; largest allocations alive there:")
    for row in table:
        print(f"  {row['gib']:7.3f} GiB  {row['origin']}")
    return {"peak_gib_above_start": peak / 2**30, "largest": table}


def profile_decode(pipe, ids, names: list[str], steps: int, report: dict) -> None:
    """Decode ms/token per compile-option variant, then the library step's kernels (no CUDA graphs)."""
    library, merge, symbolic = (
        dict(decode.COMPILE_OPTIONS),
        decode.MERGE_IN_SPLIT_KERNEL,
        decode.SYMBOLIC_CAPACITY,
    )
    variants = {  # (compile options, merge in the split kernel, symbolic capacity)
        "library": (library, merge, symbolic),
        "flip_merge": (library, not merge, symbolic),
        "flip_symbolic": (library, merge, not symbolic),
        "no_combo": ({**library, "combo_kernels": False}, merge, symbolic),
        "cublas_gemv": ({"triton.cudagraphs": True}, merge, symbolic),  # CUDA graphs only: cuBLAS GEMV
    }
    report["decode_ms"] = {}
    for name in names:
        decode.COMPILE_OPTIONS, decode.MERGE_IN_SPLIT_KERNEL, decode.SYMBOLIC_CAPACITY = variants[name]
        torch._dynamo.reset()
        pipe._decoders.clear()
        start = time.perf_counter()
        pipe(ids)
        warm = time.perf_counter() - start
        result = pipe(ids)
        ms = 1e3 * result.stats.decode_seconds_per_token
        report["decode_ms"][name] = {"ms_per_token": ms, "first_call_s": warm}
        print(f"decode {name}: {ms:.3f} ms/token (first call {warm:.1f} s)")

    context = pipe.compress(ids)
    if names[-1] == "library":  # the step as it runs, in its CUDA graph: the gaps between kernels
        print("in the CUDA graph:")
        report["graph_timeline"] = profile_steps(pipe, context, steps)
    decode.COMPILE_OPTIONS = {**library, "triton.cudagraphs": False}  # the profiler sees each kernel
    decode.MERGE_IN_SPLIT_KERNEL, decode.SYMBOLIC_CAPACITY = merge, symbolic
    torch._dynamo.reset()
    pipe._decoders.clear()
    pipe.generate(context=context, max_new_tokens=4)
    print("compiled without CUDA graphs:")
    report["decode_kernels"] = profile_steps(pipe, context, steps)


if __name__ == "__main__":
    main()
