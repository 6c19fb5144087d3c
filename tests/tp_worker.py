"""One rank of the tensor-parallel check, launched by ``torchrun`` (``tests/test_tensor_parallel.py``).

Every rank builds the same tiny model, runs it unsharded (the reference), shards it over all
ranks by its own plan (``kvpress_like.parallel.shard_model``) and runs the same calls again:
the tokens must be the reference's, and each rank's cache must keep, for each of its KV heads,
the positions the reference keeps for that head. Writes ``rank{N}.json`` with what it compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from test_decode_projections import qkv_groups, run_all_layers

from kvpress_like import hookimpl, pipeline
from kvpress_like.adapter import ModelAdapter
from kvpress_like.errors import ConfigError, PluginError
from kvpress_like.parallel import local_shard, shard_model
from kvpress_like.strategies.fastkv import FastKV

from conftest import random_rows, tiny_model

CASES = {  # strategy -> settings small enough for the tiny models' prompts
    "fastkv": dict(tsp_layer=1, tsp_rate=0.5, retain_rate=0.25, window=4),
    "snapkv": dict(retain_rate=0.3, window=4),
    "adakv": dict(retain_rate=0.3, window=4),
    "gemfilter": dict(filter_layer=1, retain_rate=0.4, window=4),
    "pyramidkv": dict(retain_rate=0.3, window=4),
    "h2o": dict(retain_rate=0.3, window=4),
    "streamingllm": dict(retain_rate=0.4, window=4, sink_tokens=2),
    "full": {},
}
LENGTHS = [61, 37]  # batch 2, different lengths (--lengths: others)


def kept_positions(context) -> list[list[list[list[int]]]]:
    """``[layer][row][head]`` -> the positions the cache keeps there."""
    out = []
    for layer in context.cache.layers:
        positions, valid = layer.positions, layer.valid
        out.append(
            [
                [positions[b, h][valid[b, h]].tolist() for h in range(positions.shape[1])]
                for b in range(positions.shape[0])
            ]
        )
    return out


def run(model, strategy: str, decode: list[str], prefill: str, lengths: list[int]) -> dict:
    pipe = pipeline(model, strategy, max_new_tokens=6, stop_on_eos=False, prefill=prefill, **CASES[strategy])
    rows = random_rows(lengths, seed=11)
    result = {"kept": kept_positions(pipe.compress(rows))}
    for mode in decode:
        result[mode] = pipe(rows, decode=mode).token_ids
    result["sampled"] = pipe(rows, decode=decode[0], do_sample=True, top_k=20, seed=5).token_ids
    return result


class RankLocalFastKV(FastKV):
    """FastKV choosing the propagated tokens from its own rank's heads only: must be refused."""

    @hookimpl
    def propagate(self, layer, scores):
        if layer.layer_idx != self.tsp_layer or scores is None:
            return None
        return self.keep_best(scores.sum(dim=1), layer, "tsp")


def refusal(model) -> str:
    pipe = pipeline(model, RankLocalFastKV, max_new_tokens=2, **CASES["fastkv"])
    try:
        pipe(random_rows(LENGTHS, seed=11))
    except PluginError as exc:
        return str(exc)
    return "not refused"


def kernel_layers_match(model) -> dict:
    """A sharded model's kernel layers (decode steps' projections) against its plain layers, on one
    token per row, for a batch of one row and of three: the same hidden states (the kernels on
    CUDA; ``F.linear`` on this rank's shards on CPU), and q, k and v in one group, whose results
    are placed back in DTensors."""
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(2)  # the same tokens on every rank
    equal = compiled_equal = True
    for rows in (1, 3):
        hidden = torch.randn(rows, 1, model.config.hidden_size, generator=generator)
        hidden = hidden.to(adapter.device, adapter.dtype)
        with torch.no_grad():
            plain = run_all_layers(adapter, hidden, kernels=False)
            kernels = run_all_layers(adapter, hidden, kernels=True)
            compiled = torch.compile(run_all_layers, fullgraph=True)(adapter, hidden, True)  # as in the step
        equal &= bool(torch.allclose(kernels, plain, rtol=1e-5, atol=1e-5))
        # compile reorders fp32 sums (2e-5 apart on qwen3); a misplaced shard is off by O(1)
        compiled_equal &= bool(torch.allclose(compiled, plain, rtol=1e-4, atol=1e-4))
    return {"equal": equal, "compiled_equal": compiled_equal, "qkv_groups": qkv_groups(adapter)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", default="llama,qwen3")
    parser.add_argument("--decode", default="eager,static")
    parser.add_argument("--strategies", default=",".join(CASES))
    parser.add_argument("--prefill", default="eager", help="the sharded run's prefill mode")
    parser.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")], default=LENGTHS)
    args = parser.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    decode = args.decode.split(",")
    report: dict = {"rank": rank, "world": world, "cases": [], "kernel_layers": {}, "head_rows": {}}
    for family in args.families.split(","):
        for strategy in args.strategies.split(","):
            model = tiny_model(family).to(device)  # the same weights on every rank (same seed)
            reference = run(model, strategy, decode, "eager", args.lengths)
            shard_model(model, init_device_mesh(args.device, (world,)))
            if family not in report["kernel_layers"]:
                report["kernel_layers"][family] = kernel_layers_match(model)
                report["head_rows"][family] = local_shard(model.get_output_embeddings().weight).shape[0]
            sharded = run(model, strategy, decode, args.prefill, args.lengths)
            heads = len(sharded["kept"][0][0])
            mine = slice(rank * heads, (rank + 1) * heads)
            expected_kept = [[row[mine] for row in layer] for layer in reference["kept"]]
            report["cases"].append(
                {
                    "family": family,
                    "strategy": strategy,
                    "local_kv_heads": heads,
                    "tokens_equal": all(sharded[m] == reference[m] for m in [*decode, "sampled"]),
                    "kept_equal": sharded["kept"] == expected_kept,
                    "tokens": {m: sharded[m] for m in decode},
                    "reference_tokens": {m: reference[m] for m in decode},
                }
            )
        report["refusal"] = refusal(model)  # the last family's sharded model
        try:
            pipeline(model, "full").compress(random_rows(LENGTHS)).save(args.out.parent / f"r{rank}.kvc")
            report["save_refusal"] = "saved"
        except ConfigError as exc:
            report["save_refusal"] = str(exc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    # Tearing down NCCL communicators that CUDA graphs captured hung on the H200 pair
    # (torch 2.11): leave once every rank is done; the launcher reaps the processes.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
