"""Compile-to-compile spread of the compiled decode step (8B shape, random bf16 weights).

The decode step's matrix-vector kernels are tuned when it compiles, and the picks vary from one
compile to the next (docs/performance.md). This measures that: ``--runs`` fresh processes, each
compiling the batch-1 step in an empty inductor cache, then ``--runs`` processes that each load the
first one's saved compile artifacts (``kvpress_like.compile_cache``, what ``kvpress-like warmup``
writes) into an empty cache instead of tuning again. Each process decodes from a context of
``--entries`` kept entries per layer: 13,107 is FastKV's (KV 0.1) at 128K, and the step reads the
same buffers whichever strategy kept them, so the full cache of a 13,107-token prompt stands in for
a 128K prefill. Writes ``compile-spread.json`` under ``--out`` and prints each group's spread.

    python benchmarks/compile_spread.py --runs 5 --out results/spread            # H200, ~12 min
    python benchmarks/compile_spread.py --tiny --runs 2 --steps 4 --entries 64 --out R   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import load_model, run_child

from kvpress_like import compile_cache, pipeline

FASTKV_128K_ENTRIES = round(131072 * 0.1)


def child(args: argparse.Namespace) -> dict:
    if args.load:
        compile_cache.load(args.load)
    model = load_model(args.tiny)
    ids = torch.randint(3, model.config.vocab_size, (1, args.entries), device=model.device)
    pipe = pipeline(model, "full", decode="compiled", max_new_tokens=args.steps + 1, stop_on_eos=False)
    begin = time.perf_counter()
    pipe(ids)  # compiles (or loads) and captures the step
    first_call_s = time.perf_counter() - begin
    if args.save:
        compile_cache.save(args.save)
    stats = pipe(ids).stats
    return {"first_call_s": first_call_s, "decode_ms": 1e3 * stats.decode_seconds_per_token}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/spread"))
    parser.add_argument("--runs", type=int, default=5, help="processes per group")
    parser.add_argument("--steps", type=int, default=64, help="measured decode steps")
    parser.add_argument("--entries", type=int, default=FASTKV_128K_ENTRIES, help="kept entries per layer")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RECORD " + json.dumps(child(args)), flush=True)
        return

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = str(Path(scratch) / "decode.compile")
        for group in ("fresh compile", "loaded artifacts"):
            for run in range(args.runs):
                cache_dir = Path(scratch) / f"{group.split()[0]}-{run}"  # empty: nothing from before
                command = [sys.executable, __file__, "--child", "--steps", str(args.steps)]
                command += ["--entries", str(args.entries)] + (["--tiny"] if args.tiny else [])
                if group == "fresh compile" and run == 0:
                    command += ["--save", artifacts]
                elif group == "loaded artifacts":
                    command += ["--load", artifacts]
                environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
                received: list[dict] = []
                error = run_child(command, started, received.append, environment)
                records.append(
                    {"group": group, "run": run, **(received[0] if received else {"error": error})}
                )
    summary = {}
    for group in ("fresh compile", "loaded artifacts"):
        decode = [r["decode_ms"] for r in records if r["group"] == group and "decode_ms" in r]
        if decode:
            spread = (max(decode) - min(decode)) / min(decode)
            summary[group] = {"decode_ms": decode, "median": statistics.median(decode), "spread": spread}
            print(
                f"{group:>17}: decode ms {', '.join(f'{d:.3f}' for d in decode)}; spread {100 * spread:.1f}%"
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {
        "command": " ".join(["python benchmarks/compile_spread.py", *sys.argv[1:]]),
        "device": device,
        "torch": torch.__version__,
        "entries": args.entries,
        "seconds": round(time.perf_counter() - started),
    }
    (args.out / "compile-spread.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1)
    )


if __name__ == "__main__":
    main()
