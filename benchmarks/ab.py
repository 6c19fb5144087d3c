"""Paired A/B of the library's constants: two pipelines over one model in one process, their decode
steps timed in alternation on the same compressed context (8B shape, random bf16, FastKV 0.2/0.1).

Runs on different machines disagree by more than a change is worth: the 32K x8 step took 5.33 and
5.58 ms/step in two calls of session 14 with the same code (docs/performance.md). Here both
variants share the GPU, the process, the weights and the context, and alternate round by round (A B,
then B A, so a drift weighs on both), so their ratio is the change's own. Each variant's settings
(``MODULE.NAME=VALUE`` of ``kvpress_like.MODULE``, as ``throughput.py --set``) are applied before
its pipeline is made and before each of its calls: constants read when the step is built, traced
or captured then hold for that pipeline's step. Writes ``ab-<length>x<batch>.json`` under ``--out``
and prints each variant's median ms/step and B / A.

    python benchmarks/ab.py --length 131072 --batch 1 --prefill-rows 1 --out R \\
        --b kernels.decode_attention.PROGRAMMATIC_LAUNCH=False                      # H200
    python benchmarks/ab.py --tiny --length 96 --batch 2 --steps 3 --rounds 2 --out R \\
        --b decode.MERGE_IN_SPLIT_KERNEL=False                                      # smoke
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

sys.path.insert(0, str(Path(__file__).parent))
from speed import SYSTEMS, load_model
from throughput import constant, override

from kvpress_like import pipeline
from kvpress_like.kernels.decode_attention import launches_early


def paired(args: argparse.Namespace) -> dict:
    """Both variants' ms/step, round by round, and the medians' ratio B / A."""
    variants = {"a": args.a, "b": args.b}
    named = [constant(setting) for settings in variants.values() for setting in settings]
    defaults = [(module, name, getattr(module, name)) for module, name in named]

    def use(name: str) -> None:
        """The library's defaults, then this variant's settings."""
        for module, constant_name, value in defaults:
            setattr(module, constant_name, value)
        for setting in variants[name]:
            override(setting)

    for name in ("b", "a"):  # a bad setting fails before the model is built; A's settings load it
        use(name)
    model = load_model(args.tiny)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length), device=model.device)
    strategy, options = SYSTEMS["fastkv"]
    pipes, context, early = {}, None, {}
    for name in variants:
        use(name)
        early[name] = launches_early(model.device)
        pipes[name] = pipeline(
            model, strategy, max_new_tokens=args.steps + 1, stop_on_eos=False, prefill_rows=args.prefill_rows,
            **options,
        )  # fmt: skip
        if context is None:  # one context: the same entries for both
            context = pipes[name].compress(ids)
        begin = time.perf_counter()
        pipes[name].generate(context=context)  # compiles its step and captures it for this bucket
        print(f"{name}: first call {time.perf_counter() - begin:.1f} s", flush=True)
    ms = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
            use(name)
            stats = pipes[name].generate(context=context).stats
            ms[name].append(1e3 * stats.decode_seconds_per_token)
        print(f"round {round_}: a {ms['a'][-1]:.3f}  b {ms['b'][-1]:.3f} ms/step", flush=True)
    for pipe in pipes.values():
        pipe.close()
    medians = {name: statistics.median(values) for name, values in ms.items()}
    return {
        "settings": variants,
        "launches_early": early,
        "ms_per_step": ms,
        "median_ms": medians,
        "b_over_a": medians["b"] / medians["a"],
        "b_over_a_by_round": [b / a for a, b in zip(ms["a"], ms["b"], strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=131072, help="prompt tokens per row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per call (their median)")
    parser.add_argument("--rounds", type=int, default=6, help="calls per variant, alternating")
    parser.add_argument("--prefill-rows", type=int, default=None, help="rows per prefill part")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    for name in ("a", "b"):
        parser.add_argument(
            f"--{name}", action="append", default=[], metavar="MODULE.NAME=VALUE",
            help=f"a kvpress_like constant for variant {name.upper()} (repeatable; none: the defaults)",
        )  # fmt: skip
    args = parser.parse_args()
    # As throughput.py runs both systems; read when CUDA first allocates, which is after this.
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if not args.a and not args.b:
        parser.error("--a or --b: give at least one setting, or both variants are the same")
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be at least 1 (got {args.rounds} and {args.steps})")
    result = {
        "meta": {
            "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "allocator": os.environ["PYTORCH_CUDA_ALLOC_CONF"],
        },
        **paired(args),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-{args.length}x{args.batch}.json"
    path.write_text(json.dumps(result, indent=1))
    medians = result["median_ms"]
    print(f"A {medians['a']:.3f} ms/step, B {medians['b']:.3f}, B / A {result['b_over_a']:.4f} -> {path}")


if __name__ == "__main__":
    main()
