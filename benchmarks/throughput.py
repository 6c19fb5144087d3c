"""Serving throughput: decode tokens/s against batch size at one context length (8B shape, random bf16).

For every batch size and system: the batch's prefill seconds (from the call's start to its first
token; ``model_prefill_s``: the layers alone, the sum of each part's ``prefill_part_s``), decode
ms/step (median of the measured steps) and tokens/s (rows / step time), peak GPU memory (for
kvpress_like also by phase: held before the call, the prefill's peak, held after it, the decode's
peak), the decode's bandwidth floor (weights plus the batch's kept caches at 4.3 TB/s) and the ratio
to it, and ``start_s``: the seconds a fresh pipeline at this batch size takes to prefill a short
prompt and make its first two tokens (compiling or capturing its decode step). Each system runs in a
process of its own, with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` for all of them
(``--allocator`` sets another), and the batch sizes in order: ``start_s`` of the first is a compile,
of the later ones a new batch size's start. After the first batch that runs out of memory, larger
ones are not tried. ``--largest`` then searches for the largest batch that fits the GPU: for each
phase (prefill, decode), a line through the two largest batches' peaks predicts it, the smaller
prediction is tried, a batch that runs out of memory halves the interval, at most four tries. Writes
``throughput-<length>.json`` and ``.png`` under ``--out`` and prints a table; ``--join`` puts earlier
runs at one length (transformers' and FastKV's, say) into one table and plot.

    python benchmarks/throughput.py --length 32768 --batches 1,8,16,32,64,128 --prefill-rows 4 \\
        --systems fastkv,transformers --out results/throughput          # H200
    python benchmarks/throughput.py --length 131072 --batches 1,4,8,16 --prefill-rows 1 --out R
    python benchmarks/throughput.py --tiny --length 96 --batches 1,2 --steps 3 --out R    # smoke

``--set MODULE.NAME=VALUE`` (repeatable) sets a constant of ``kvpress_like.MODULE`` in the measuring
processes, for A/B runs of the library's choices (``--set decode.MERGE_IN_SPLIT_KERNEL=False``); the
settings are written into the JSON.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import (
    SYSTEMS,
    free_between_cases,
    limits,
    load_model,
    run_child,
    run_transformers,
    timed_call,
)
from speed_report import pyplot

from kvpress_like import pipeline

WARM_UP_TOKENS = 256  # a short prompt: the first call at a batch size is its decode step's start


def run_kvpress(model, ids: torch.Tensor, steps: int, system: str, prefill_rows: int | None) -> dict:
    """A fresh pipeline: a short call (its start), one part's prefill at full length (compiles for
    it), then the measured call on the whole batch, without the short call's buffers."""
    strategy, settings = SYSTEMS[system]
    batch = ids.shape[0]
    pipe = pipeline(
        model, strategy, max_new_tokens=steps + 1, stop_on_eos=False, prefill_rows=prefill_rows, **settings
    )
    begin = time.perf_counter()
    pipe(ids[:, -WARM_UP_TOKENS:], max_new_tokens=2)  # returns once both tokens are on the host
    start_s = time.perf_counter() - begin
    pipe.compress(ids[: prefill_rows or batch])  # one part at full length: prefill compiles here
    pipe.close()  # the short call's decode buffers: at batch 128 a 256-slot bucket, 4 GiB
    memory = phase_memory(pipe) if model.device.type == "cuda" else {}
    parts = part_seconds(pipe)
    out, first_token_s = timed_call(pipe, ids)
    stats = out.stats
    pipe.close()
    if memory:
        memory["decode_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return {
        "prefill_s": first_token_s,
        "model_prefill_s": stats.prefill_seconds,
        "prefill_part_s": parts,
        "decode_ms": 1e3 * stats.decode_seconds_per_token,
        "steps": len(stats.decode_step_seconds),
        "start_s": start_s,
        "kept_per_row": stats.cache_bytes_kept / batch,
        **memory,
    }


def phase_memory(pipe) -> dict:
    """GiB allocated before the measured call (weights, and anything a closed pipeline failed to
    give back); then, filled in as the call runs, its prefill's peak and what the prefill leaves
    held (weights plus the batch's kept caches). The peak is reset after the prefill, so the
    allocator's peak at the end is the decode's (buffers loaded, steps run). Benchmark
    instrumentation: the pipeline's prefill is wrapped on this instance only."""
    torch.cuda.synchronize()
    memory = {"held_before_gib": torch.cuda.memory_allocated() / 2**30}
    torch.cuda.reset_peak_memory_stats()
    prefill = pipe._prefill

    def measured_prefill(*args, **kwargs):
        context = prefill(*args, **kwargs)
        torch.cuda.synchronize()
        memory["prefill_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        memory["held_after_prefill_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return context

    pipe._prefill = measured_prefill
    return memory


def part_seconds(pipe) -> list[float]:
    """Filled in as the call runs: each prefill part's seconds (``prefill_rows`` rows at a time),
    in order, to tell a part that runs slower than the others. Benchmark instrumentation: the
    pipeline's part prefill is wrapped on this instance only."""
    seconds: list[float] = []
    prefill_rows = pipe._prefill_rows

    def timed_prefill_rows(*args, **kwargs):
        context = prefill_rows(*args, **kwargs)
        seconds.append(context.stats.prefill_seconds)
        return context

    pipe._prefill_rows = timed_prefill_rows
    return seconds


def constant(setting: str) -> tuple[object, str]:
    """(module, name) of the constant a ``MODULE.NAME=VALUE`` setting names in kvpress_like."""
    module_name, _, name = setting.partition("=")[0].rpartition(".")
    try:
        module = importlib.import_module(f"kvpress_like.{module_name}")
    except ImportError:
        raise SystemExit(f"{setting}: no module kvpress_like.{module_name}") from None
    if not hasattr(module, name):
        raise SystemExit(f"{setting}: kvpress_like.{module_name} has no {name}")
    return module, name


def override(setting: str) -> None:
    """Apply one ``--set MODULE.NAME=VALUE``: a Python literal for a constant kvpress_like has."""
    module, name = constant(setting)
    try:
        setattr(module, name, ast.literal_eval(setting.partition("=")[2]))
    except (ValueError, SyntaxError):
        raise SystemExit(f"{setting}: the value must be a Python literal (True, 4, 'always')") from None


def measure(
    system: str, length: int, batches: list[int], steps: int, tiny: bool, prefill_rows, largest: bool
):
    """One record per batch size, in order; after an out-of-memory batch the larger ones are skipped.
    With ``largest``, then the batch sizes ``next_largest`` proposes, until it has found the largest
    that fits (those records have ``"search": True``)."""
    model = load_model(tiny)
    cfg, device = model.config, model.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    weights = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0

    def about(batch: int) -> dict:
        return {"system": system, "length": length, "batch": batch, "device": name, "weights_gib": weights}

    def case(batch: int) -> dict:
        print(f"{system} {length}x{batch} at {time.strftime('%H:%M:%S')}", flush=True)
        ids = torch.randint(3, cfg.vocab_size, (batch, length), device=device)
        try:
            if SYSTEMS[system] is None:
                torch._dynamo.reset()  # transformers' compiled forward is tied to one static cache size
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                result = run_transformers(model, ids, steps)
                result["start_s"] = result.pop("first_call_s")  # its warm-up is a whole call
            else:
                result = run_kvpress(model, ids, steps, system, prefill_rows)
        except torch.OutOfMemoryError as exc:
            result = {"error": f"OutOfMemoryError: {exc}"[:300], "out_of_memory": True}
        except Exception as exc:  # report and go on: one failing case must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if device.type == "cuda":  # kvpress_like's phases reset the peak: the whole call's is their max
            phases = [result.get("prefill_peak_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30]
            result["peak_gib"] = max(phases)
        floors = limits(cfg, system.split("-")[0], length, batch)
        if "decode_ms" in result:
            result["tokens_per_s"] = 1e3 * batch / result["decode_ms"]
            result["decode_vs_floor"] = result["decode_ms"] / floors["decode_floor_ms"]
        del ids
        free_between_cases(model)
        return {**about(batch), "decode_floor_ms": floors["decode_floor_ms"], **result}

    out_of_memory = None
    fitted: list[tuple[int, tuple[float, ...]]] = []  # (batch, its phases' peaks) of those that decoded
    for batch in batches:
        if out_of_memory is not None:
            yield {**about(batch), "error": f"not tried: batch {out_of_memory} ran out of memory"}
            continue
        record = case(batch)
        if record.get("out_of_memory"):
            out_of_memory = batch
        elif "decode_ms" in record:
            fitted.append((batch, phase_peaks(record)))
        yield record
    if not largest:
        return
    capacity = CAPACITY_SHARE * torch.cuda.get_device_properties(device).total_memory / 2**30
    for _ in range(SEARCH_TRIES):
        try:
            batch = next_largest(fitted, out_of_memory, capacity, prefill_rows or 1)
        except ValueError as exc:  # too few batch sizes decoded to fit a line through
            print(f"no search for the largest batch: {exc}")
            return
        if batch is None:
            return
        record = {**case(batch), "search": True}
        yield record
        if record.get("out_of_memory"):
            out_of_memory = batch  # below the last one: proposals stay under the interval's middle
        elif "decode_ms" in record:
            fitted.append((batch, phase_peaks(record)))
        else:
            return  # another failure: the search has nothing to go on


# Of the GPU's memory, what a batch's predicted peak may take. H200 (139.8 GiB), 32K x272: an
# allocation failed with 129.9 GiB allocated and 1.75 more asked (94.2%), the process holding
# 138.5 GiB in all (docs/results/session17-h200): 0.92 (128.6 GiB) keeps ~3 GiB below that.
CAPACITY_SHARE = 0.92
MIN_GAIN = 1 / 16  # the least growth over the best fitted batch that the search still tries
SEARCH_TRIES = 4  # batch sizes the search for the largest may try (a 32K x256 case takes ~4 minutes)


def phase_peaks(record: dict) -> tuple[float, ...]:
    """A record's peak GiB per phase (kvpress_like: prefill, decode), else the whole call's."""
    phases = [record[key] for key in ("prefill_peak_gib", "decode_peak_gib") if key in record]
    return tuple(phases) if len(phases) == 2 else (record.get("peak_gib", 0.0),)


def next_largest(
    fitted: list[tuple[int, tuple[float, ...]]], out_of_memory: int | None, capacity_gib: float, multiple: int
):
    """The next batch size to try in the search for the largest that fits, or None when it is found.

    ``fitted``: (batch, peak GiB of each phase) of the batches that decoded; ``out_of_memory``: the
    smallest batch that did not. A phase's peak is the weights and its working set plus caches that
    grow with the batch (the prefill holds the kept entries, the decode its static buffers of a
    capacity bucket: H200, 32K, 0.408 and 0.465 GiB a row), so each grows linearly with the batch: per
    phase, the line through the two largest fitted batches predicts the largest whose peak stays
    within ``capacity_gib``; the smaller prediction, rounded down to a ``multiple`` (the prefill's
    rows per part), is proposed. Below a batch that ran out of memory, the search halves the
    interval instead. A proposal less than ``MIN_GAIN`` above the best is not worth its prefill
    (minutes at 32K): the search ends."""
    if len(fitted) < 2:
        raise ValueError(f"--largest: needs two batch sizes that decode to fit a line through, got {fitted}")
    (small, small_peaks), (best, best_peaks) = sorted(fitted)[-2:]
    predictions = []
    for small_peak, best_peak in zip(small_peaks, best_peaks, strict=True):
        per_row = (best_peak - small_peak) / (best - small)
        predictions.append(best + (capacity_gib - best_peak) / per_row if per_row > 0 else 2 * best)
    predicted = min(predictions)
    if out_of_memory is not None:
        predicted = min(predicted, (best + out_of_memory) / 2)
    candidate = int(predicted) // multiple * multiple
    return candidate if candidate >= best * (1 + MIN_GAIN) else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results/throughput"))
    parser.add_argument("--length", type=int, default=32768, help="prompt tokens per row")
    parser.add_argument("--batches", default="1,8,16,32,64,128", help="batch sizes, comma-separated")
    parser.add_argument("--systems", default="fastkv,transformers", help=f"among {list(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=64, help="measured decode steps")
    parser.add_argument("--prefill-rows", type=int, help="kvpress_like: rows per prefill part")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument(
        "--largest",
        action="store_true",
        help="then search for the largest batch that fits the GPU (CUDA only)",
    )
    parser.add_argument(
        "--allocator",
        default="expandable_segments:True",
        help="PYTORCH_CUDA_ALLOC_CONF of the measuring processes ('' for torch's default allocator)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="MODULE.NAME=VALUE", help="a kvpress_like constant"
    )
    parser.add_argument(
        "--join",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="measure nothing: one table and plot of earlier runs at one length (e.g. each system's)",
    )
    parser.add_argument("--system", help=argparse.SUPPRESS)  # run this one system in this process
    args = parser.parse_args()
    if args.join:
        join_runs(args.join, args.out, parser)
        return
    batches = [int(b) for b in args.batches.split(",")]
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: {unknown} not among {list(SYSTEMS)}")
    if args.largest and (args.tiny or not torch.cuda.is_available()):
        parser.error(
            "--largest: the search for the largest batch measures GPU memory; needs CUDA, not --tiny"
        )
    if args.largest and len(batches) < 2:
        parser.error(
            f"--largest: needs at least two --batches to fit the peak's growth per row, got {batches}"
        )
    for setting in args.set:  # in the parent too: a bad setting stops it, not every measuring process
        override(setting)
    if args.system:
        records = measure(
            args.system, args.length, batches, args.steps, args.tiny, args.prefill_rows, args.largest
        )
        for record in records:
            print("RECORD " + json.dumps(record), flush=True)
        return

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"throughput-{args.length}.json"
    environment = {
        k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    }
    if args.allocator:
        environment["PYTORCH_CUDA_ALLOC_CONF"] = args.allocator
    records: list[dict] = []

    def write(complete: bool) -> None:
        meta = {
            "command": " ".join(["python benchmarks/throughput.py", *sys.argv[1:]]),
            "complete": complete,
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "allocator": args.allocator or "torch's default",
            "seconds": round(time.perf_counter() - started),
            "settings": args.set,
        }
        partial = path.with_suffix(".json.partial")  # a kill mid-write must not truncate the last JSON
        partial.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        partial.replace(path)

    def receive(record: dict) -> None:
        records.append(record)
        write(complete=False)

    for system in systems:
        command = [sys.executable, __file__, "--system", system, "--length", str(args.length)]
        command += ["--batches", args.batches, "--steps", str(args.steps)]
        command += ["--tiny"] if args.tiny else []
        command += ["--largest"] if args.largest else []
        command += ["--prefill-rows", str(args.prefill_rows)] if args.prefill_rows else []
        command += [f"--set={setting}" for setting in args.set]
        error = run_child(command, started, receive, environment)
        received = {r["batch"] for r in records if r["system"] == system}
        missed = [b for b in batches if b not in received]  # what the process died before measuring
        records.extend({"system": system, "length": args.length, "batch": b, "error": error} for b in missed)
    write(complete=True)
    print_table(records)
    plot(records, path.with_suffix(".png"))


def join_runs(paths: list[Path], out: Path, parser: argparse.ArgumentParser) -> None:
    """Write ``throughput-<length>-joined.json`` and ``.png`` under ``out`` from the records of the
    runs in ``paths``, in their order, and print their table."""
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
            runs.append((path, run["meta"], run["records"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--join: {path} must be a throughput.py JSON file ({type(exc).__name__}: {exc})")
    records = [record for _, _, run_records in runs for record in run_records]
    lengths = sorted({record["length"] for record in records})
    if len(lengths) != 1:
        parser.error(f"--join: the runs must share one context length, got {lengths}")
    out.mkdir(parents=True, exist_ok=True)
    joined = out / f"throughput-{lengths[0]}-joined.json"
    meta = {"joined": [{"file": str(path), **run_meta} for path, run_meta, _ in runs]}
    joined.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print_table(records)
    plot(records, joined.with_suffix(".png"))


def print_table(records: list[dict]) -> None:
    print(
        f"\n{'system':>14} {'batch':>6} {'prefill s':>10} {'decode ms':>10} {'tokens/s':>9} "
        f"{'floor ms':>9} {'/floor':>7} {'peak GiB':>9} {'start s':>8}"
    )
    for r in records:
        if "decode_ms" not in r:
            print(f"{r['system']:>14} {r['batch']:>6}  {r.get('error', '')[:90]}")
            continue
        searched = " (the search for the largest)" if r.get("search") else ""
        print(
            f"{r['system']:>14} {r['batch']:>6} {r['prefill_s']:>10.2f} {r['decode_ms']:>10.2f} "
            f"{r['tokens_per_s']:>9.0f} {r['decode_floor_ms']:>9.2f} {r['decode_vs_floor']:>7.2f} "
            f"{r.get('peak_gib', 0):>9.1f} {r['start_s']:>8.1f}{searched}"
        )


def plot(records: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(r["system"] for r in records):
        done = sorted(
            (r for r in records if r["system"] == system and "decode_ms" in r), key=lambda r: r["batch"]
        )
        if done:
            speed.plot([r["batch"] for r in done], [r["tokens_per_s"] for r in done], "o-", label=system)
            memory.plot([r["batch"] for r in done], [r.get("peak_gib", 0) for r in done], "o-", label=system)
    length = records[0]["length"] // 1024 if records else 0
    for ax, label in ((speed, "decode tokens/s"), (memory, "peak GPU memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows)")
        ax.set_title(f"{label}, {length}K context")
        ax.grid(alpha=0.3)
    speed.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
