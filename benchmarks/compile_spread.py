"""Compile-to-compile spread of the compiled decode step (8B shape, random bf16 weights).

Where inductor tunes the decode step's matrix-vector kernels as it compiles (``--paths
inductor``), the picks vary from one compile to the next (docs/performance.md). This measures
that: ``--runs`` fresh processes, each compiling the batch-1 step in an empty inductor cache,
then ``--runs`` processes that each load the first one's saved compile artifacts
(``kvpress_like.compile_cache``, what ``kvpress-like warmup`` writes) into an empty cache instead
of tuning again (``--groups``). ``--paths`` names the step's kernels: ``one-row`` (the
default: the projections in the fixed-tile one-row kernel, ``decode.PROJECTION_KERNELS``, the rest
untuned), ``one-row-tuned`` (the same, inductor tuning the rest: ``decode.TUNE_BESIDE_KERNELS``)
and ``inductor`` (inductor's tuned reductions for everything, the path before the kernel); each
path runs every group. Each process decodes from a context of
``--entries`` kept entries per layer: 13,107 is FastKV's (KV 0.1) at 128K, and the step reads the
same buffers whichever strategy kept them, so the full cache of a 13,107-token prompt stands in
for a 128K prefill. Writes ``compile-spread.json`` under ``--out`` and prints each group's spread
and first-call seconds.

    python benchmarks/compile_spread.py --runs 5 --out results/spread
    python benchmarks/compile_spread.py --runs 2 --paths one-row,inductor --groups fresh --out R
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

from kvpress_like import compile_cache, decode, pipeline

FASTKV_128K_ENTRIES = round(131072 * 0.1)


GROUPS = {"fresh": "fresh compile", "loaded": "loaded artifacts"}
PATHS = ("one-row", "one-row-tuned", "inductor")


def child(args: argparse.Namespace) -> dict:
    decode.PROJECTION_KERNELS = args.paths != "inductor"
    decode.TUNE_BESIDE_KERNELS = args.paths == "one-row-tuned"  # the output head, norms, RoPE
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
    parser.add_argument("--groups", default="fresh,loaded", help=f"comma-separated, of {list(GROUPS)}")
    parser.add_argument("--paths", default="one-row", help=f"comma-separated, of {list(PATHS)}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    groups, paths = [GROUPS[g] for g in args.groups.split(",")], args.paths.split(",")
    if set(paths) - set(PATHS):
        parser.error(f"--paths: each must be one of {list(PATHS)} (got {args.paths!r})")
    if groups[0] != GROUPS["fresh"]:
        parser.error(
            f"--groups: must start with fresh, whose first run saves the artifacts (got {args.groups!r})"
        )
    if args.child:
        print("RECORD " + json.dumps(child(args)), flush=True)
        return

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        for path in paths:
            artifacts = str(Path(scratch) / f"{path}.compile")
            for group in groups:
                for run in range(args.runs):
                    cache_dir = Path(scratch) / f"{path}-{group.split()[0]}-{run}"  # empty, fresh
                    command = [sys.executable, __file__, "--child", "--paths", path]
                    command += ["--steps", str(args.steps), "--entries", str(args.entries)]
                    command += ["--tiny"] if args.tiny else []
                    if group == "fresh compile" and run == 0:
                        command += ["--save", artifacts]
                    elif group == "loaded artifacts":
                        command += ["--load", artifacts]
                    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
                    received: list[dict] = []
                    error = run_child(command, started, received.append, environment)
                    record = received[0] if received else {"error": error}
                    records.append({"path": path, "group": group, "run": run, **record})
    summary = {}
    for path in paths:
        for group in groups:
            found = [r for r in records if (r["path"], r["group"]) == (path, group) and "decode_ms" in r]
            if not found:
                continue
            decode_ms = [r["decode_ms"] for r in found]
            first = [r["first_call_s"] for r in found]
            spread = (max(decode_ms) - min(decode_ms)) / min(decode_ms)
            summary[f"{path}, {group}"] = {
                "decode_ms": decode_ms, "median": statistics.median(decode_ms), "spread": spread,
                "first_call_s": first,
            }  # fmt: skip
            print(
                f"{path:>8}, {group:>17}: decode ms {', '.join(f'{d:.3f}' for d in decode_ms)}; spread "
                f"{100 * spread:.1f}%; first call s {', '.join(f'{s:.1f}' for s in first)}"
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
