"""Speed and memory of transformers vs kvpress_like on a Llama-3.1-8B-shaped model (random bf16 weights).

One run, one GPU: for each (prompt length, batch) and each system, prefill seconds (from the
call's start to its first token for both systems: kvpress_like's prompt checks and buffer loading
count, as transformers' input preparation does; ``model_prefill_s``: its layers alone), decode
ms/token (median of the measured steps, after warm-up), peak GPU memory, and the ratio to the
physical limits (FLOPs at 790 TFLOP/s for prefill, bytes at 4.3 TB/s for decode). Writes
``speed.json`` and ``speed.png`` under ``--out`` and prints a table.

    python benchmarks/speed.py --out results/speed                 # the full run (H200)
    python benchmarks/speed.py --tiny --cases 256x1 --steps 4      # a smoke run on any machine
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria

from kvpress_like import pipeline

sys.path.insert(0, str(Path(__file__).parent))
from speed_report import check_targets, plot, print_table, print_targets

PEAK_FLOPS, PEAK_BYTES = 790e12, 4.3e12  # H200 ceilings: benchmarks/ceilings.py, docs/performance.md
FASTKV = dict(tsp_layer=15, tsp_rate=0.2, retain_rate=0.1)
SYSTEMS = {
    "transformers": None,  # full cache, StaticCache + torch.compile (generate's own compiled path)
    # The library's fastest prefill: decoder layers through torch.compile, full-attention layers
    # 16K tokens at a time (the default prefill_chunk); H200, 128K: 5.80 s vs 6.15 s eager
    # (docs/results/profile-h200-prefill-chunked.json).
    "fastkv": ("fastkv", {**FASTKV, "prefill": "compiled"}),
    "full": ("full", {}),
    "snapkv": ("snapkv", {"retain_rate": 0.1}),
    # FastKV sampling inside the compiled step (temperature, top-k, top-p), against greedy "fastkv"
    "fastkv-sample": ("fastkv", {**FASTKV, "prefill": "compiled", "do_sample": True, "temperature": 0.7,
                                 "top_k": 50, "top_p": 0.9, "seed": 0}),
}  # fmt: skip


def llama8b_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=1 << 17,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=1 << 17,
        rope_theta=500000.0,
    )


class StepClock(StoppingCriteria):
    """Records the time of every generation step (generate synchronises there anyway)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_transformers(model, ids: torch.Tensor, steps: int) -> dict:
    def once():
        clock = StepClock()
        start = time.perf_counter()
        model.generate(
            ids,
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            cache_implementation="static",
            stopping_criteria=[clock],
            pad_token_id=0,
        )
        return start, clock.times

    warm_up = time.perf_counter()
    once()  # compile and capture
    first_call_s = time.perf_counter() - warm_up
    start, times = once()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "prefill_s": times[0] - start,
        "decode_ms": 1e3 * statistics.median(gaps),
        "steps": len(gaps),
        "first_call_s": first_call_s,
    }


def timed_call(pipe, ids: torch.Tensor):
    """A kvpress_like call and its seconds to the first token: the whole call's less its decode
    steps' (like transformers' from ``generate``'s start, which counts its input preparation); the
    call's closing work after the last step counts too, so this bounds it from above."""
    begin = time.perf_counter()
    out = pipe(ids)
    return out, time.perf_counter() - begin - sum(out.stats.decode_step_seconds)


def run_kvpress(model, ids: torch.Tensor, steps: int, strategy: str, settings: dict) -> dict:
    pipe = pipeline(model, strategy, max_new_tokens=steps + 1, stop_on_eos=False, **settings)
    warm_up = time.perf_counter()
    pipe(ids)  # compile and capture (same bucket as the measured call)
    first_call_s = time.perf_counter() - warm_up
    out, first_token_s = timed_call(pipe, ids)
    stats = out.stats
    return {
        "prefill_s": first_token_s,
        "model_prefill_s": stats.prefill_seconds,
        "decode_ms": 1e3 * stats.decode_seconds_per_token,
        "steps": len(stats.decode_step_seconds),
        "first_call_s": first_call_s,
        "kv_kept_per_layer": [row[0] for row in stats.kv_kept_per_layer],
        "tokens_per_layer": [row[0] for row in stats.tokens_per_layer],
    }


def limits(cfg: LlamaConfig, system: str, length: int, batch: int) -> dict:
    """Physical floors: prefill FLOPs at PEAK_FLOPS, decode bytes (weights + cache read) at PEAK_BYTES."""
    layers, hidden, heads = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    weights_per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    weights_per_layer += 3 * hidden * cfg.intermediate_size
    tokens, kept = [length] * layers, length
    if system == "fastkv":
        reduced = round(length * FASTKV["tsp_rate"])
        tokens = [length if i <= FASTKV["tsp_layer"] else reduced for i in range(layers)]
    if system in ("fastkv", "snapkv"):
        kept = round(length * 0.1)
    # matmuls: 2 FLOPs per weight per token; causal attention: 2 * T^2 * Hq * D per layer
    flops = sum(2 * weights_per_layer * t + 2 * heads * head_dim * t * t for t in tokens) * batch
    flops += 2 * hidden * cfg.vocab_size * batch  # last position's logits only
    weight_bytes = 2 * (layers * weights_per_layer + hidden * cfg.vocab_size)
    cache_bytes = batch * layers * kv_heads * head_dim * 2 * 2 * kept
    decode_floor_ms = 1e3 * (weight_bytes + cache_bytes) / PEAK_BYTES
    return {"prefill_floor_s": flops / PEAK_FLOPS, "decode_floor_ms": decode_floor_ms}


def attention_kernels(model, length: int = 8192) -> list[str]:
    """Names of the attention kernels one FastKV prefill runs (cuDNN or flash?), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    pipe = pipeline(model, "fastkv", **FASTKV)
    ids = torch.randint(3, model.config.vocab_size, (1, length), device="cuda")
    pipe.compress(ids)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.compress(ids)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(k in n.lower() for k in ("flash", "cudnn", "fmha", "attention")))


def load_model(tiny: bool):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(llama8b_config(tiny)).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    return model


def measure(
    systems: list[str], cases: list[tuple[int, int]], steps: int, tiny: bool, prefill_rows: int | None = None
) -> Iterator[dict]:
    """Every case (outer loop) for every system of one process group (inner loop)."""
    model = load_model(tiny)
    cfg, device = model.config, model.device
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    kernels_read = False
    for length, batch in cases:
        # Compiled graphs carry over from case to case (kvpress_like's decode step and compiled
        # prefill are shared by its systems, capacity buckets and batch sizes above one: a new
        # batch size's first_call_s is its start without a compile), except in transformers'
        # process, whose compiled forward is tied to one static cache size.
        if "transformers" in systems:
            torch._dynamo.reset()
        ids = torch.randint(3, cfg.vocab_size, (batch, length), device=device)
        for system in systems:
            print(f"{length}x{batch} {system}: warm-up call (compiles), then the measured call", flush=True)
            resident = 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated() / 2**30  # weights (+ leftovers, if any)
            try:
                if SYSTEMS[system] is None:
                    result = run_transformers(model, ids, steps)
                else:
                    strategy, settings = SYSTEMS[system]
                    result = run_kvpress(
                        model, ids, steps, strategy, {**settings, "prefill_rows": prefill_rows}
                    )
            except Exception as exc:  # report and go on: one failing case must not hide the others
                result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            if device.type == "cuda":
                result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                result["resident_gib_at_start"] = resident
            floors = limits(cfg, system.split("-")[0], length, batch)  # fastkv-sample: fastkv's
            if "prefill_s" in result:
                result["prefill_vs_floor"] = result["prefill_s"] / floors["prefill_floor_s"]
                result["decode_vs_floor"] = result["decode_ms"] / floors["decode_floor_ms"]
            if system == "fastkv" and device.type == "cuda" and "prefill_s" in result and not kernels_read:
                result["prefill_attention_kernels"] = attention_kernels(model)  # once: same for every case
                kernels_read = True
            yield {
                "system": system,
                "length": length,
                "batch": batch,
                "device": device_name,
                **floors,
                **result,
            }
            free_between_cases(model)


def free_between_cases(model) -> None:
    """Drop what a case left: transformers' static cache (it would size the next one to at least
    this one) and, through the collector, a pipeline's decoders (whole static caches)."""
    for attribute in ("_cache", "_previous_max_cache_length", "_compiled_call"):
        vars(model).pop(attribute, None)
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def run_child(command: list[str], started: float, receive, env: dict | None = None) -> str:
    """Run a measuring process: each ``RECORD <json>`` line it prints is printed and given to
    ``receive``, other lines are echoed with the seconds since ``started``. Returns its exit
    status and the end of its stderr (why it stopped, if it stopped early)."""
    with tempfile.TemporaryFile("w+") as errors:  # a file: a full stderr pipe would block the child
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        for line in child.stdout:
            if line.startswith("RECORD "):
                record = json.loads(line[len("RECORD ") :])
                print(json.dumps(record)[:300], flush=True)
                receive(record)
            else:
                print(f"[{time.perf_counter() - started:5.0f} s] {line.rstrip()}", flush=True)
        status = child.wait()
        errors.seek(0)
        return f"exit status {status}: " + errors.read()[-500:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/speed"))
    parser.add_argument("--cases", default="32768x1,131072x1,32768x4", help="LENGTHxBATCH, comma-separated")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--steps", type=int, default=64, help="measured decode steps")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument(
        "--process-per-system",
        action="store_true",
        help="every system in a process of its own (default: transformers in one, the kvpress_like "
        "systems together in another, sharing their compiled graphs)",
    )
    parser.add_argument(
        "--prefill-rows",
        type=int,
        help="kvpress_like systems prefill this many rows at a time (a big batch's peak)",
    )
    parser.add_argument("--group", help=argparse.SUPPRESS)  # run these SYSTEMS in this process
    args = parser.parse_args()
    cases = [tuple(map(int, case.split("x"))) for case in args.cases.split(",")]
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"--systems: {sorted(unknown)} not among {list(SYSTEMS)}")
    started = time.perf_counter()

    if args.group:
        for record in measure(args.group.split(","), cases, args.steps, args.tiny, args.prefill_rows):
            print("RECORD " + json.dumps(record), flush=True)
        return

    # transformers runs in a process of its own: its compiled graphs, CUDA-graph pools and
    # allocator state must not meet kvpress_like's (seen: a transformers run after a kvpress_like
    # run in the same process decoded 4x slower than in a process of its own). The kvpress_like
    # systems share one process so that they compile their decode step once per batch size, not
    # once per case and system. Inductor's on-disk caches are shared by all processes. The JSON is
    # rewritten after every measurement and progress is printed as it happens: a run cut short
    # keeps what it measured and shows where its time went.
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    kernels: set[str] = set()
    order = {case: i for i, case in enumerate(cases)}

    def write(complete: bool) -> dict:
        records.sort(key=lambda r: order[(r["length"], r["batch"])])  # stable: systems stay in order
        seconds = time.perf_counter() - started
        meta = {
            "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]]),
            "complete": complete,
            "prefill_attention_kernels": sorted(kernels),
            "date": time.strftime("%Y-%m-%d"),
            "device": next((r["device"] for r in records if "device" in r), "unknown"),
            "torch": torch.__version__,
            "steps": args.steps,
            "tiny": args.tiny,
            "seconds": round(seconds),
            "targets": check_targets(records, seconds),
        }
        partial = args.out / "speed.json.partial"  # a kill mid-write must not truncate the last JSON
        partial.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        partial.replace(args.out / "speed.json")
        return meta

    def receive(record: dict) -> None:
        kernels.update(record.pop("prefill_attention_kernels", []))
        records.append(record)
        write(complete=False)

    systems = args.systems.split(",")
    if args.process_per_system:
        groups = [[system] for system in systems]
    else:
        kvpress = [system for system in systems if system != "transformers"]
        groups = [
            group for group in (["transformers"] if "transformers" in systems else [], kvpress) if group
        ]
    for group in groups:
        command = [sys.executable, __file__, "--group", ",".join(group), "--cases", args.cases]
        command += ["--steps", str(args.steps)]
        command += ["--tiny"] if args.tiny else []
        command += ["--prefill-rows", str(args.prefill_rows)] if args.prefill_rows else []
        error = run_child(command, started, receive)
        received = {(r["system"], r["length"], r["batch"]) for r in records}
        for length, batch in cases:  # what the process died before measuring
            for system in group:
                if (system, length, batch) not in received:
                    records.append({"system": system, "length": length, "batch": batch, "error": error})
        write(complete=False)
    meta = write(complete=True)
    print("prefill attention kernels:", sorted(kernels))
    print_table(records)
    print_targets(meta["targets"])
    plot(records, args.out / "speed.png")


if __name__ == "__main__":
    main()
