"""Decode attention on one GPU: the Triton split-K kernel against torch SDPA, replayed from CUDA graphs.

For each batch size and cache length C (a static buffer of capacity C, every (row, KV head) holding
``fill * C`` entries) it times, as the median of CUDA-event timings of single graph replays:
``triton`` (kvpress_like.kernels.decode_attention), ``triton_merged`` (the same, its last split merging
the partial results: one launch instead of two), ``sdpa_exact`` (SDPA on views cut to the length,
enable_gqa, no mask) and ``sdpa_mask`` (SDPA over the whole capacity with a boolean mask). Bandwidth is
the K+V bytes of the valid entries over the time; errors are max |out - reference| with the fp32
reference. Small C fits in L2 (60 MB), so its bandwidth is not HBM bandwidth.

    python benchmarks/decode_kernel.py --out results/decode_kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvpress_like.kernels import decode_attention, decode_attention_reference


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
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
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
