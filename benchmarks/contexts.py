"""Saved contexts: bytes on disk per prompt token, and save / load time against prefill time.

For each prompt length and strategy (full cache; FastKV tsp_rate 0.2, retain_rate 0.1; SnapKV at
the same retain_rate): prefill (``compress``), save, load, and the first new token from the
loaded context against prefill plus that first token. Timings are medians of ``--repeats``
after a warm-up call; the file is read back from the page cache (a warm disk). Writes
``contexts.json`` under ``--out`` and prints a markdown table.

    python benchmarks/contexts.py --out docs/results/contexts-cpu                  # SmolLM2, CPU
    python benchmarks/contexts.py --model llama8b --lengths 32768,131072 --prefill compiled \
        --full-max 32768 --out R                                                   # 8B shape, GPU
    python benchmarks/contexts.py --model tiny --lengths 256 --repeats 1          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import load_model  # a sibling script

from kvpress_like import Context, pipeline

STRATEGIES = {
    "full": {},
    "fastkv": dict(tsp_rate=0.2, retain_rate=0.1),
    "snapkv": dict(retain_rate=0.1),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last result."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def model_and_tokenizer(name: str):
    if name == "smollm2":
        from kvpress_like.models import load_smollm2

        return load_smollm2()
    return load_model(tiny=name == "tiny"), None


def measure_one(pipe, ids: torch.Tensor, path: Path, repeats: int) -> dict:
    """Prefill, first token, save and load of one prompt; the loaded context must continue as the
    one in memory does."""
    device = pipe.adapter.device
    prefill_s, context = timed(lambda: pipe.compress(ids), repeats, device)
    first_s, _ = timed(lambda: pipe.generate(context=context), repeats, device)
    save_s, _ = timed(lambda: context.save(path), repeats, device)
    load_s, loaded = timed(lambda: Context.load(path, pipe), repeats, device)
    assert pipe.generate(context=loaded).token_ids == pipe.generate(context=context).token_ids
    size = path.stat().st_size
    path.unlink()
    return {
        "file_bytes": size,
        "file_bytes_per_token": size / ids.shape[1],
        "cache_bytes_full": context.stats.cache_bytes_full,
        "cache_bytes_kept": context.stats.cache_bytes_kept,
        "prefill_s": prefill_s,
        "first_token_s": first_s,
        "save_s": save_s,
        "load_s": load_s,
        "prefill_then_token_s": prefill_s + first_s,
        "load_then_token_s": load_s + first_s,
        "speedup_load_vs_prefill": (prefill_s + first_s) / (load_s + first_s),
    }


def measure(args: argparse.Namespace) -> list[dict]:
    model, tokenizer = model_and_tokenizer(args.model)
    device = model.device
    folder = Path(tempfile.mkdtemp(prefix="contexts-", dir=args.tmp))
    rows = []
    for length in args.lengths:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)
        for name in args.strategies:
            if name == "full" and length > args.full_max:
                continue  # a full 128K cache of the 8B shape is 16 GiB on disk
            settings = STRATEGIES[name]
            pipe = pipeline(
                model, name, tokenizer=tokenizer, decode="eager", max_new_tokens=1, prefill=args.prefill,
                **settings,
            )  # fmt: skip
            row = {
                "model": args.model,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "tokens": length,
                "strategy": name,
                "settings": settings,
                **measure_one(pipe, ids, folder / f"{name}-{length}.kvc", args.repeats),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| tokens | strategy | file MiB | bytes/token | full cache MiB | prefill s | save s | load s "
        "| prefill+1st token s | load+1st token s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["tokens"],
            r["strategy"],
            f"{r['file_bytes'] / 2**20:.1f}",
            f"{r['file_bytes_per_token']:.0f}",
            f"{r['cache_bytes_full'] / 2**20:.1f}",
            *(f"{r[key]:.3f}" for key in ("prefill_s", "save_s", "load_s")),
            *(f"{r[key]:.3f}" for key in ("prefill_then_token_s", "load_then_token_s")),
            f"{r['speedup_load_vs_prefill']:.1f}x",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "llama8b", "tiny"], default="smollm2")
    parser.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 8192]
    )
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    parser.add_argument("--full-max", type=int, default=65536, help="longest prompt to save a full cache of")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--tmp", help="folder for the files (default: the system's temporary folder)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = measure(args)
    print(table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "contexts.json").write_text(json.dumps(rows, indent=1))
        (args.out / "contexts.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
