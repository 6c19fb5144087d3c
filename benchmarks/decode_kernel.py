"""Decode attention on one GPU: the Triton split-K kernel against torch SDPA, replayed from CUDA graphs.

For each batch size and cache length C (a static buffer of capacity C, every (row, KV head) holding
``fill * C`` entries) it times, as the median of CUDA-event timings of single graph replays:
``triton`` (kvpress_like.kernels.decode_attention), ``triton_merged`` (the same, its last split merging
the partial results: one launch instead of two), ``sdpa_exact`` (SDPA on views cut to the length,
enable_gqa, no mask) and ``sdpa_mask`` (SDPA over the whole capacity with a boolean mask). Bandwidth is
the K+V bytes of the valid entries over the time; errors are max |out - reference| with the fp32
reference. Small C fits in L2 (60 MB), so its bandwidth is not HBM bandwidth.

``--sweep B:C:LENGTH ...`` times the kernel as a decode step runs it: one call per layer over
``--layers`` caches of their own (together far beyond L2), in one CUDA graph, merging the splits
as the library does (``decode.MERGE_IN_SPLIT_KERNEL``); microseconds per layer for every tile of a
grid at the library's split count and at the count of the session-11 rule (unless ``--no-grid``),
then every candidate split count on the library's tile, the library's configuration with each
merge, and ``--splits`` on ``--split-tiles`` with each of ``--merges``.

    python benchmarks/decode_kernel.py --out results/decode_kernel.json
    python benchmarks/decode_kernel.py --sweep 1:14336:13107 8:4096:3277 --out R/attention-sweep.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvpress_like.decode import MERGE_IN_SPLIT_KERNEL
from kvpress_like.kernels import decode_attention, decode_attention_reference

# The module (the package exports the function under the same name).
attention_module = importlib.import_module("kvpress_like.kernels.decode_attention")

SWEEP_TILES = [  # block_n, num_warps, num_stages
    (32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2),
]  # fmt: skip


def time_graph(fn: Callable[[], torch.Tensor], replays: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph, and the graph's output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles here) off the capture stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(10):
        graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), out


def write_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """``rows`` and the run's device, torch version and arguments as JSON at ``args.out``."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        args={**vars(args), "out": str(args.out)},
    )
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


def bench(b: int, cap: int, args: argparse.Namespace) -> list[dict]:
    hq, hkv, d, dtype = args.hq, args.hkv, args.head_dim, torch.bfloat16
    length = max(1, round(args.fill * cap))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, cap, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, cap, d, device="cuda", dtype=dtype, generator=gen)
    lengths = torch.full((b, hkv), length, device="cuda", dtype=torch.int32)
    scale = d**-0.5
    mask = (torch.arange(cap, device="cuda") < length)[None, None, None].expand(b, 1, 1, cap)
    q4 = q[:, :, None]
    arrivals = torch.zeros(b * hkv, device="cuda", dtype=torch.int32)
    impls = {
        "triton": lambda: decode_attention(q, k, v, lengths, scale, num_splits=args.num_splits),
        "triton_merged": lambda: decode_attention(  # the last split merges: one launch
            q, k, v, lengths, scale, num_splits=args.num_splits, arrivals=arrivals
        ),
        "sdpa_exact": lambda: F.scaled_dot_product_attention(
            q4, k[:, :, :length], v[:, :, :length], scale=scale, enable_gqa=True
        )[:, :, 0],
        "sdpa_mask": lambda: F.scaled_dot_product_attention(
            q4, k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )[:, :, 0],
    }
    ref = decode_attention_reference(q.float(), k, v, lengths, scale)  # fp32 query: fp32 output
    nbytes = 2 * b * hkv * length * d * k.element_size()
    rows = []
    for name, fn in impls.items():
        ms, out = time_graph(fn, args.replays)
        err = (out.float() - ref).abs().max().item()
        rows.append(dict(impl=name, B=b, C=cap, length=length, ms=ms, GBps=nbytes / ms / 1e6, max_err=err))
    return rows


def session11_splits(cap: int, programs: int, sms: int) -> int:
    """The split count of the rule before session 12 (about four programs per SM, capacity-sized
    splits), to compare with."""
    wanted = min(attention_module.MAX_SPLITS, max(1, math.ceil(attention_module.WAVES * sms / programs)))
    count = max(1, min(wanted, cap // attention_module.MIN_SPLIT))
    split = math.ceil(cap / count / 64) * 64
    return math.ceil(cap / split)


def sweep(case: str, args: argparse.Namespace) -> list[dict]:
    """Microseconds per layer for one ``B:C:LENGTH`` case (see the module docstring)."""
    b, cap, length = map(int, case.split(":"))
    hq, hkv, d, dtype = args.hq, args.hkv, args.head_dim, torch.bfloat16
    per_layer = 2 * b * hkv * cap * d * 2
    layers = max(2, min(args.layers, (4 << 30) // per_layer))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, d, device="cuda", dtype=dtype, generator=gen)
    caches = [
        (torch.randn(b, hkv, cap, d, device="cuda", dtype=dtype, generator=gen),
         torch.randn(b, hkv, cap, d, device="cuda", dtype=dtype, generator=gen))
        for _ in range(layers)
    ]  # fmt: skip
    lengths = torch.full((b, hkv), length, device="cuda", dtype=torch.int32)
    arrivals = torch.zeros(b * hkv, device="cuda", dtype=torch.int32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    library = attention_module._split_count(cap, b * hkv, sms)
    older = session11_splits(cap, b * hkv, sms)
    most = max(1, min(attention_module.MAX_SPLITS, cap // attention_module.MIN_SPLIT))
    candidates = {attention_module._split_count(cap, b * hkv, sms, per_sm) for per_sm in (1, 2, 3, 4, 6)}
    candidates |= {library, older, most}
    nbytes = 2 * b * hkv * length * d * 2
    ref = decode_attention_reference(q.float(), *caches[-1], lengths, d**-0.5)

    def measure(tile: tuple[int, int, int], splits: int, merge_here: bool = MERGE_IN_SPLIT_KERNEL) -> dict:
        config = dict(zip(("block_n", "num_warps", "num_stages"), tile, strict=True))
        scratch = arrivals if merge_here else None  # None: a merge kernel of its own after the split one

        def step() -> torch.Tensor:
            for keys, values in caches:
                out = decode_attention(
                    q, keys, values, lengths, d**-0.5, num_splits=splits, arrivals=scratch, tile=config
                )
            return out

        ms, out = time_graph(step, args.replays)
        us = 1e3 * ms / layers
        err = (out.float() - ref).abs().max().item()
        return dict(B=b, C=cap, length=length, layers=layers, tile=list(tile), splits=splits,
                    merge_here=merge_here, library_splits=library, session11_splits=older, us_per_layer=us,
                    GBps=nbytes / us / 1e3, max_err=err)  # fmt: skip

    lib_tile = tuple(attention_module.TILE[key] for key in ("block_n", "num_warps", "num_stages"))
    rows = [measure(lib_tile, library, merge_here) for merge_here in (False, True)]
    if not args.no_grid:
        grid = [(tile, n) for tile in SWEEP_TILES for n in sorted({library, older})]
        rows += [measure(tile, n) for tile, n in grid if (tile, n) != (lib_tile, library)]  # timed above
        rows += [measure(lib_tile, splits) for splits in sorted(candidates - {library, older})]
    tiles = [tuple(int(v) for v in tile.split(",")) for tile in args.split_tiles]
    merges = [merge == "here" for merge in args.merges]
    rows += [measure(tile, splits, here) for tile in tiles for splits in args.splits for here in merges]
    return rows


def print_sweep(rows: list[dict]) -> None:
    print(f"{'case':<16}{'tile':<14}{'splits':>7}{'us/layer':>10}{'GB/s':>8}  note")
    for r in rows:
        note = "library" if r["splits"] == r["library_splits"] else ""
        note += " session-11 count" if r["splits"] == r["session11_splits"] else ""
        note += " merged in the split kernel" if r["merge_here"] else " merge kernel"
        case, tile = f"{r['B']}:{r['C']}:{r['length']}", str(tuple(r["tile"]))
        print(f"{case:<16}{tile:<14}{r['splits']:>7}{r['us_per_layer']:>10.2f}{r['GBps']:>8.0f}  {note}")
    for case in dict.fromkeys((r["B"], r["C"]) for r in rows):
        best = min((r for r in rows if (r["B"], r["C"]) == case), key=lambda r: r["us_per_layer"])
        print(f"best at B={case[0]} C={case[1]}: {tuple(best['tile'])}, {best['splits']} splits, "
              f"{best['us_per_layer']:.2f} us")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--capacity", type=int, nargs="+", default=[256, 13107, 32768, 131072])
    parser.add_argument("--fill", type=float, default=1.0, help="valid entries per (row, head), over C")
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--num-splits", type=int, default=None, help="override the kernel's split count")
    parser.add_argument("--sweep", nargs="+", metavar="B:C:LENGTH", help="step-like sweep of these cases")
    parser.add_argument("--layers", type=int, default=32, help="--sweep: caches of their own, one per layer")
    parser.add_argument(
        "--splits", type=lambda v: [int(n) for n in v.split(",")], default=[],
        help="--sweep: split counts to time as well (beyond the library's limits too), on --split-tiles",
    )  # fmt: skip
    parser.add_argument(
        "--split-tiles", nargs="+", default=["64,4,2"], help="BLOCK_N,WARPS,STAGES of --splits"
    )
    library_merge = "here" if MERGE_IN_SPLIT_KERNEL else "kernel"
    parser.add_argument(
        "--merges", nargs="+", choices=["kernel", "here"], default=[library_merge],
        help="--splits: merge in a kernel of its own, in the split kernel, or both",
    )  # fmt: skip
    parser.add_argument(
        "--no-grid", action="store_true", help="--sweep: only the library's count and --splits"
    )

    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    if args.sweep:
        rows = [row for case in args.sweep for row in sweep(case, args)]
        print_sweep(rows)
        write_rows(args, rows)
        return
    rows = [row for b in args.batch for cap in args.capacity for row in bench(b, cap, args)]
    print(f"{'impl':<14}{'B':>3}{'C':>8}{'length':>8}{'us':>10}{'GB/s':>9}{'max_err':>10}")
    for r in rows:
        print(
            f"{r['impl']:<14}{r['B']:>3}{r['C']:>8}{r['length']:>8}{r['ms'] * 1e3:>10.1f}"
            f"{r['GBps']:>9.0f}{r['max_err']:>10.2e}"
        )
    write_rows(args, rows)


if __name__ == "__main__":
    main()
