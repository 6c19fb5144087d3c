"""The two ceilings the speed benchmark's floors use, measured on this GPU: a large bf16 matrix
product on random data (TFLOP/s) and a large device-to-device copy (TB/s, bytes read + written).
Median of ``--repeats`` by CUDA events, after a warm-up.

    python benchmarks/ceilings.py --out results/
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def timed_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="matrix side of the product")
    parser.add_argument("--copy-gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b = (
        torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "ab"
    )
    matmul_ms = timed_ms(lambda: a @ b, args.repeats)
    source = torch.randn(int(args.copy_gib * 2**30) // 2, device="cuda", dtype=torch.bfloat16, generator=gen)
    target = torch.empty_like(source)
    copy_ms = timed_ms(lambda: target.copy_(source), args.repeats)
    result = {
        "device": torch.cuda.get_device_name(),
        "bf16_matmul_tflops": 2 * args.size**3 / matmul_ms / 1e9,
        "copy_tb_per_s": 2 * source.numel() * source.element_size() / copy_ms / 1e9,
        "matmul_ms": matmul_ms,
        "copy_ms": copy_ms,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ceilings.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
