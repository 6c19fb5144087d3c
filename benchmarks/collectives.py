"""What the GPUs of one host give tensor parallelism: peer access, the transport NCCL picks, and the
all-reduce times of the two sizes a sharded Llama step moves (decode: one token's hidden state;
prefill: a 16K-token chunk's), eager and inside a CUDA graph, NCCL against symmetric memory's
one-shot all-reduce (peer loads, no NVLink multicast).

    torchrun --nproc-per-node 2 benchmarks/collectives.py --out R      # writes R/collectives.json

Keep NVLink multicast off on the lent machines (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1); set NCCL_DEBUG=INFO to see the
transport in NCCL's own log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIZES = {  # name: elements of bf16
    "decode 8b (1 x 4096)": 4096,
    "decode 70b (1 x 8192)": 8192,
    "decode 70b batch 16 (16 x 8192)": 16 * 8192,
    "prefill chunk 8b (16384 x 4096)": 16384 * 4096,
}
GRAPH_CALLS = 64  # all-reduces per captured graph: a sharded 8B step does 64


def timed(run, repeats: int) -> float:
    """Median milliseconds of ``run()`` over ``repeats`` (after two warm-ups)."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def in_graph(collective, repeats: int) -> float:
    """Milliseconds per call of ``GRAPH_CALLS`` calls of ``collective()`` captured in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        collective()  # warm-up outside capture (NCCL and symmetric memory set up lazily)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            collective()
    return timed(graph.replay, repeats) / GRAPH_CALLS


def measure(numel: int, device: torch.device, group_name: str, symmetric: bool) -> dict:
    x = torch.ones(numel, dtype=torch.bfloat16, device=device)
    repeats = 20 if numel > 1 << 20 else 50
    row = {"bytes": 2 * numel, "nccl_eager_ms": timed(lambda: dist.all_reduce(x), repeats)}
    row["nccl_graph_ms"] = in_graph(lambda: dist.all_reduce(x), repeats)
    if symmetric:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(numel, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(buf, group_name)
        buf.fill_(1.0)
        out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group_name)
        row["one_shot_correct"] = bool((out == dist.get_world_size()).all())
        op = torch.ops.symm_mem.one_shot_all_reduce
        row["one_shot_eager_ms"] = timed(lambda: op(buf, "sum", group_name), repeats)
        row["one_shot_graph_ms"] = in_graph(lambda: op(buf, "sum", group_name), repeats)
    if numel > 1 << 20:
        row["nccl_eager_gb_s"] = 2 * numel / row["nccl_eager_ms"] / 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group_name = dist.group.WORLD.group_name
    peers = {
        f"{a}->{b}": torch.cuda.can_device_access_peer(a, b)
        for a in range(torch.cuda.device_count())
        for b in range(torch.cuda.device_count())
        if a != b
    }
    symmetric = all(peers.values())
    report = {"world": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "peer_access": peers, "rows": {}}  # fmt: skip
    for name, numel in SIZES.items():
        try:
            report["rows"][name] = measure(numel, device, group_name, symmetric and numel <= 1 << 20)
        except Exception as error:  # a transport that cannot run is a finding, not a crash
            report["rows"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        if rank == 0:
            print(name, json.dumps(report["rows"][name]), flush=True)
    if rank == 0 and args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "collectives.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as tensor_parallel.py: captured NCCL communicators hung at teardown


if __name__ == "__main__":
    main()
