"""Decode's matrix products on one GPU: the fixed-tile Triton kernels against cuBLAS and inductor.

For each weight shape of a model (``--model 8b``: the Llama-3.1-8B projections and output head, or
the same sharded over ``--tp`` ranks), and each group of weights read from one input (q, k and v;
gate and up), it times ``y = x @ W.T`` for x of ``--rows`` rows (1: a batch-1 decode step; up to
16: a small batch's, on the tensor-core tile; the output head for one row only) as one call among
``copies`` back to back in a CUDA graph, each on its own copy of the weights (together over 1 GB,
so that no weight is read from L2), and reports microseconds per call and the weights' bytes over
that time:

- ``cublas``: ``F.linear`` per weight;
- ``triton``: the kernel of ``kvpress_like.kernels.matvec`` with the library's fixed tile, one
  launch per group (also for the products the library leaves to cuBLAS), and ``--sweep`` every
  tile of a grid (the best is printed per shape);
- ``inductor`` (one row): ``torch.compile`` with coordinate-descent tuning, which lowers a one-row
  product to a tuned reduction; ``--inductor-runs N`` compiles it in N fresh
  processes, each with an empty inductor cache, to show how far apart the tuning's picks land.

    python benchmarks/matvec.py --sweep --inductor-runs 3 --out R/matvec.json
    python benchmarks/matvec.py --rows 2,4,8,16 --sweep --out R/matvec-rows.json
    python benchmarks/matvec.py --rows 8,16 --splits 2,4,8 --out R/matvec-split.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.decode_kernel import time_graph, write_rows
from kvpress_like.kernels import matvec as matvec_module

MODELS = {  # (hidden, q heads * head_dim, kv heads * head_dim, mlp, vocab)
    "8b": (4096, 4096, 1024, 14336, 128256),
    "70b": (8192, 8192, 1024, 28672, 128256),
}


def groups(model: str, tp: int) -> dict[str, list[tuple[int, int]]]:
    """(N, K) of the weights each one-row product reads on one of ``tp`` ranks (column-parallel N,
    row-parallel K split); groups of several are the products over one input (one launch)."""
    hidden, q, kv, mlp, vocab = MODELS[model]
    return {
        "q": [(q // tp, hidden)],
        "kv": [(kv // tp, hidden)],
        "qkv": [(q // tp, hidden), (kv // tp, hidden), (kv // tp, hidden)],
        "o": [(hidden, q // tp)],
        "gate": [(mlp // tp, hidden)],
        "gate_up": [(mlp // tp, hidden), (mlp // tp, hidden)],
        "down": [(hidden, mlp // tp)],
        "head": [(vocab, hidden)],
    }


def sweep_tiles(rows: int) -> list[matvec_module.Tile]:
    if rows > 1:  # tensor-core tiles: [BLOCK_N, BLOCK_K] weight tiles pipelined over num_stages
        grid = itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4, 5))
        return [matvec_module.Tile(*t) for t in grid]
    grid = itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (2, 4, 8), (1, 3))
    # The fp32 accumulator [BLOCK_N, BLOCK_K] stays in registers.
    return [matvec_module.Tile(*t) for t in grid if t[0] * t[1] <= 8192 and t[1] >= 32 * t[2]]


def operands(group: list[tuple[int, int]], rows: int = 1) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """``rows`` rows and enough copies of the group's weights to read over 1 GB per pass."""
    nbytes = sum(n * k * 2 for n, k in group)
    copies = max(2, math.ceil(2**30 / nbytes))
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = group[0][1]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    sets = [
        [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5 for n, k in group]
        for _ in range(copies)
    ]
    return x, sets


def measure(fn, x: torch.Tensor, sets: list[list[torch.Tensor]], replays: int) -> tuple[float, float]:
    """(microseconds per call, max |error| against fp64) for ``fn(x, weights)`` over every copy."""
    ms, outs = time_graph(lambda: [fn(x, weights) for weights in sets], replays)
    err = max(
        (out.double() - x.double() @ w.double().T).abs().max().item()
        for out, w in zip(outs[0], sets[0], strict=True)
    )
    return ms * 1e3 / len(sets), err


def kernel(tile: matvec_module.Tile):
    """The kernel with ``tile`` itself, also where the library leaves a product to cuBLAS
    (``matvec.serves``: a few rows over ``FEW_ROWS_MAX_K`` columns); a split tile gets counters."""
    counters = torch.zeros(4096, dtype=torch.int32, device="cuda") if tile.split_k > 1 else None
    return lambda x, weights: matvec_module.launch(x, weights, [None] * len(weights), tile, counters)


def one_by_one(linear):
    return lambda x, weights: [linear(x, w) for w in weights]


def inductor_rows(args: argparse.Namespace) -> list[dict]:
    from kvpress_like.decode import COMPILE_OPTIONS

    options = {**COMPILE_OPTIONS, "triton.cudagraphs": False}
    rows = []
    for name, group in groups(args.model, args.tp).items():
        x, sets = operands(group)
        compiled = torch.compile(one_by_one(F.linear), options=options, dynamic=False)
        us, err = measure(compiled, x, sets, args.replays)
        rows.append(dict(impl="inductor", shape=name, group=group, us=us, err=err))
        del x, sets
        torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="8b")
    parser.add_argument("--tp", type=int, default=1, help="the shapes of one of this many ranks")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time every tile of the grid")
    parser.add_argument("--inductor-runs", type=int, default=1)
    parser.add_argument(
        "--rows", type=lambda v: [int(r) for r in v.split(",")], default=[1],
        help="batch rows, comma-separated (1: the one-row kernel; up to 16: the few-rows kernel)",
    )  # fmt: skip
    parser.add_argument(
        "--splits", type=lambda v: [int(n) for n in v.split(",")], default=[],
        help="a few rows: also time the library's tile split over the columns in this many parts",
    )  # fmt: skip
    parser.add_argument("--only-inductor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_inductor:
        args.out.write_text(json.dumps(inductor_rows(args)))
        return
    rows = []
    for run in range(args.inductor_runs if 1 in args.rows else 0):
        with tempfile.TemporaryDirectory() as cache:
            part = Path(cache) / "rows.json"
            argv = [sys.executable, __file__, "--only-inductor", "--out", str(part), "--model", args.model,
                    "--tp", str(args.tp), "--replays", str(args.replays)]  # fmt: skip
            subprocess.run(argv, check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            rows += [dict(r, run=run) for r in json.loads(part.read_text())]
    for batch in args.rows:
        tiles = sweep_tiles(batch) if args.sweep else []
        for name, group in groups(args.model, args.tp).items():
            if batch > 1 and name == "head":  # batches' output head stays in the compiled step's GEMM
                continue
            x, sets = operands(group, batch)
            shape = name if batch == 1 else f"{name} x{batch}"
            us, err = measure(one_by_one(F.linear), x, sets, args.replays)
            rows.append(dict(impl="cublas", shape=shape, group=group, us=us, err=err))
            tile = matvec_module.tile_for(group[0][1], batch, [n for n, _ in group], x.device)
            us, err = measure(kernel(tile), x, sets, args.replays)
            rows.append(dict(impl="triton", shape=shape, group=group, us=us, err=err, tile=vars(tile)))
            swept = list(tiles)
            if batch > 1:  # the library's tile and a longer one, split over the columns
                wide = dataclasses.replace(tile, block_k=min(256, tile.block_k * 2), num_stages=4)
                swept += [dataclasses.replace(t, split_k=n) for t in (tile, wide) for n in args.splits]
            for tile in swept:
                try:
                    us, err = measure(kernel(tile), x, sets, 10)
                except Exception as exc:  # a tile the compiler refuses (registers, shared memory)
                    print(f"skip {tile}: {type(exc).__name__}", file=sys.stderr)
                    continue
                rows.append(dict(impl="sweep", shape=shape, group=group, us=us, err=err, tile=vars(tile)))
            del x, sets
    for row in rows:
        row["GBps"] = sum(n * k * 2 for n, k in row["group"]) / row["us"] / 1e3
    print(f"{'shape':<8}  {'impl':<10}{'us':>9}{'GB/s':>7}  tile")
    best = {}
    for row in rows:
        if row["impl"] == "sweep":
            if row["shape"] not in best or row["us"] < best[row["shape"]]["us"]:
                best[row["shape"]] = row
            continue
        print(
            f"{row['shape']:<8}  {row['impl']:<10}{row['us']:>9.1f}{row['GBps']:>7.0f}  {row.get('tile', '')}"
        )
    for shape, row in best.items():
        print(f"{shape:<8}  {'best':<10}{row['us']:>9.1f}{row['GBps']:>7.0f}  {row['tile']}")
    print_layer_totals(rows)
    write_rows(args, rows)


LAYER = ("qkv", "o", "gate_up", "down")  # one decoder layer's launches


def print_layer_totals(rows: list[dict]) -> None:
    """Microseconds of one decoder layer's products per implementation (and the five best swept tiles)."""
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        name, _, batch = row["shape"].partition(" ")
        if name in LAYER:
            key = (batch or "x1", row["impl"] if row["impl"] != "sweep" else str(tuple(row["tile"].values())))
            totals.setdefault(key, {})[name] = row["us"]
    whole = {key: sum(parts.values()) for key, parts in totals.items() if len(parts) == len(LAYER)}
    for batch in sorted({b for b, _ in whole}, key=lambda b: int(b[1:])):
        ranked = sorted((us, impl) for (b, impl), us in whole.items() if b == batch)
        fixed = [f"{impl} {us:.1f}" for us, impl in ranked if impl in ("cublas", "triton", "inductor")]
        swept = [f"{impl} {us:.1f}" for us, impl in ranked if impl.startswith("(")][:5]
        print(f"per layer {batch}: {', '.join(fixed)}; best tiles: {', '.join(swept)}")


if __name__ == "__main__":
    main()
