"""Tensor-parallel speed: kvpress_like on a model sharded over the GPUs of one host, against one
GPU and against transformers' own forward on the same sharded model.

Launch one process per GPU (a single process is the 1-GPU run)::

    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --shape 8b --lengths 131072 --out R
    python benchmarks/tensor_parallel.py --shape 8b --lengths 131072 --out R          # 1 GPU
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --shape 70b --lengths 32768,131072 \\
        --systems fastkv,transformers --out R
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --shape tiny --lengths 256   # CPU smoke
    python benchmarks/tensor_parallel.py --report R     # the tables of R's results, and tp.png

``--profile`` adds where one more prefill and a few decode steps spend their time (kernels and
host calls), ``--prefill compiled`` runs kvpress_like's compiled prefill, ``--layers`` cuts the
shape short for quick checks.

Random bf16 weights are built on the meta device, sharded by the model's own plan
(``kvpress_like.parallel.shard_model``) and only then materialised, each rank its own shards: a
70B model is never whole anywhere. ``transformers`` is the sharded model's own forward with a
DynamicCache (its eager path: static cache + compile needs one compile per cache size).
Rank 0 writes ``tp-<shape>-<N>gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpress_like import pipeline
from kvpress_like.parallel import local_shard, shard_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_fastkv import kernel_table
from speed_report import pyplot

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=32, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
    # Llama-3.1-405B: 8 KV heads, so one per rank on 8 GPUs (issue: runs on 4 and 8 GPUs)
    "405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                 num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
FASTKV = dict(tsp_rate=0.2, retain_rate=0.1)  # tsp_layer: the strategy's default (mid-depth)
PEAK_BYTES = 4.22e12  # measured H200 copy bandwidth (benchmarks/ceilings.py, docs/performance.md)


def build(shape: str, device: torch.device, mesh, layers: int | None = None) -> LlamaForCausalLM:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 17, rope_theta=500000.0)
    config.num_hidden_layers = layers or config.num_hidden_layers
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if mesh is not None:
        shard_model(model, mesh)
    model.to_empty(device=device)
    # Same seed on every rank: replicated weights (embedding, norms, head) are equal everywhere.
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = local_shard(param)
            local.fill_(1.0) if "norm" in name else local.normal_(0, 0.02, generator=generator)
        # to_empty left the rotary buffers uninitialised: rebuild them from the config
        with device:
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def weight_bytes(model) -> int:
    """Bytes of this rank's weights (its shards plus the replicated parts)."""
    return sum(local_shard(p).nbytes for p in model.parameters())


def run_kvpress(model, system: str, ids: torch.Tensor, steps: int, modes: dict, profiled: bool) -> dict:
    settings = FASTKV if system == "fastkv" else {}
    pipe = pipeline(model, system, max_new_tokens=steps, stop_on_eos=False, **modes, **settings)
    pipe.generate(ids[:, :512], max_new_tokens=4)  # warm-up: kernels, the compiled step
    # and a prefill at the measured length: the first one there ran 1.5 s (1 GPU) and 2.4 s
    # (2 GPUs) slower than the next (8B, 128K, H200 pair; not yet attributed, docs/tensor_parallel.md)
    pipe.compress(ids)
    _sync()
    start = time.perf_counter()
    context = pipe.compress(ids)
    _sync()
    prefill = time.perf_counter() - start
    out = pipe.generate(context=context)
    row = {
        "prefill_s": prefill,
        "decode_ms": 1e3 * out.stats.decode_seconds_per_token,
        "kept_cache_bytes": context.stats.cache_bytes_kept,
        "tokens": out.token_ids[0][:8],
    }
    if profiled:  # one more prefill and a few steps under the profiler: where this rank's time goes
        row["decode_profile"] = profiled_run(lambda: pipe.generate(context=context, max_new_tokens=8))
        del context
        row["prefill_profile"] = profiled_run(lambda: pipe.compress(ids))
    return row


def profiled_run(run) -> dict:
    """Wall and kernel seconds of ``run()``, its top kernels (``profile_fastkv.kernel_table``) and
    the host calls that took the most time (graph launches or kernel launches?)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        _sync()
        wall = time.perf_counter() - start
    table, kernel_ms = kernel_table(prof, 25)
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    host_calls = [{"name": e.key[:80], "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                  for e in host]  # fmt: skip
    return {"wall_s": wall, "kernel_s": kernel_ms / 1e3, "kernels": table, "host": host_calls}


@torch.inference_mode()
def run_transformers(model, ids: torch.Tensor, steps: int) -> dict:
    model(ids, use_cache=True, logits_to_keep=1)  # warm-up at the measured length, as for kvpress
    _sync()
    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync()
    prefill = time.perf_counter() - start
    token, times = out.logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync()
        times.append(time.perf_counter() - start)
    kept = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return {"prefill_s": prefill, "decode_ms": 1e3 * statistics.median(times[2:] or times),
            "kept_cache_bytes": kept}  # fmt: skip


COLUMNS = ("shape", "GPUs", "tokens", "system", "prefill s", "decode ms/token", "floor ms", "decode / floor",
           "peak GiB (max rank)", "weights GiB/rank")  # fmt: skip


def report(folder: Path) -> str:
    """Markdown tables of the rows of every ``tp-*.json`` in ``folder`` (smaller models first) and
    of each sharded row's speed-up over the same case on one GPU, and their plot (``tp.png``)."""
    rows = [row for path in folder.glob("tp-*.json") for row in json.loads(path.read_text())["rows"]]
    rows.sort(key=lambda r: (r["weights_gib_per_rank"] * r["gpus"], r["gpus"], r["length"], r["system"]))
    lines = [_row(COLUMNS), "|" + "---|" * len(COLUMNS)]
    for r in rows:
        values = (r["shape"], r["gpus"], r["length"], r["system"], f"{r['prefill_s']:.2f}",
                  f"{r['decode_ms']:.2f}", f"{r['floor_ms']:.2f}", f"{r['decode_vs_floor']:.2f}x",
                  f"{r['peak_gib_max_rank']:.1f}", f"{r['weights_gib_per_rank']:.1f}")  # fmt: skip
        lines.append(_row(values))
    _plot(rows, folder / "tp.png")
    return "\n".join([*lines, "", *_scaling(rows)])


def _row(values) -> str:
    return "| " + " | ".join(map(str, values)) + " |"


def _scaling(rows: list[dict]) -> list[str]:
    """Speed-up on N GPUs over one, and the scaling efficiency (speed-up / N), per case."""
    single = {(r["shape"], r["length"], r["system"]): r for r in rows if r["gpus"] == 1}
    columns = ("shape", "tokens", "system", "GPUs", "prefill speed-up", "decode speed-up",
               "efficiency (prefill / decode)")  # fmt: skip
    lines = [_row(columns), "|" + "---|" * len(columns)]
    for r in rows:
        one = single.get((r["shape"], r["length"], r["system"]))
        if r["gpus"] > 1 and one is not None:
            prefill, decode = one["prefill_s"] / r["prefill_s"], one["decode_ms"] / r["decode_ms"]
            efficiency = f"{prefill / r['gpus']:.0%} / {decode / r['gpus']:.0%}"
            lines.append(_row((r["shape"], r["length"], r["system"], r["gpus"], f"{prefill:.2f}x",
                               f"{decode:.2f}x", efficiency)))  # fmt: skip
    return lines if len(lines) > 2 else []


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    labels = [f"{r['shape']} {r['length'] // 1024}K\n{r['gpus']} GPU {r['system']}" for r in rows]
    at = range(len(rows))
    fig, (decode, prefill) = plt.subplots(1, 2, figsize=(12, 4.5))
    decode.bar(at, [r["decode_ms"] for r in rows], label="decode")
    floors = [r["floor_ms"] for r in rows]
    decode.scatter(at, floors, color="black", marker="_", s=400, label="floor", zorder=3)
    decode.set_yscale("log")
    decode.set_title("decode ms/token (log) against its bandwidth floor")
    decode.legend()
    prefill.bar(at, [r["prefill_s"] for r in rows])
    prefill.set_title("prefill s")
    for ax in (decode, prefill):
        ax.set_xticks(list(at), labels, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[131072])
    parser.add_argument("--systems", default="fastkv,full")
    parser.add_argument("--decode", default="compiled", help="kvpress_like's decode mode")
    parser.add_argument("--prefill", default="eager", help="kvpress_like's prefill mode (eager, compiled)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", action="store_true", help="profile one more prefill per system")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape has (quick checks)")
    parser.add_argument("--report", type=Path, help="only tabulate and plot the results in this folder")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    start = time.perf_counter()
    model = build(args.shape, device, mesh, args.layers)
    rows, build_s = [], time.perf_counter() - start
    weights = weight_bytes(model)
    for length in args.lengths:
        ids = torch.randint(
            3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)
        )
        ids = ids.to(device)
        for system in args.systems.split(","):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if system == "transformers":
                row = run_transformers(model, ids, args.steps)
            else:
                modes = dict(decode=args.decode, prefill=args.prefill)
                row = run_kvpress(model, system, ids, args.steps, modes, args.profile)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
            if mesh is not None:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            floor_ms = 1e3 * (weights + row["kept_cache_bytes"]) / PEAK_BYTES
            row.update(shape=args.shape, layers=model.config.num_hidden_layers, gpus=world, length=length,
                       system=system, prefill=args.prefill if system != "transformers" else "eager",
                       floor_ms=floor_ms,
                       peak_gib_max_rank=float(peak), weights_gib_per_rank=weights / 2**30,
                       decode_vs_floor=row["decode_ms"] / floor_ms)  # fmt: skip
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0 and args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"build_s": build_s, "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows}
        (args.out / f"tp-{args.shape}-{world}gpu.json").write_text(json.dumps(result, indent=1))
    if mesh is not None:
        # Tearing down NCCL communicators that CUDA graphs captured hung on the H200 pair
        # (torch 2.11): leave once every rank is done; the launcher reaps the processes.
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
