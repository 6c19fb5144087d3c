"""What checking the hooks' answers costs in prefill: FastKV's prefill with the checks
(``contracts.HookRunner``) against the same hooks called by pluggy with no checks, alternated in
one process, median of ``--repeats`` each. Decoding asks no hooks, so it has nothing to measure.

    python benchmarks/contract_cost.py --length 32768 --out results/   # 8B shape on a GPU
    python benchmarks/contract_cost.py --tiny --length 2048            # anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from speed import FASTKV, load_model

from kvpress_like import pipeline


class UncheckedHooks:
    """The hooks as pluggy calls them, answers unchecked: the baseline of the checks' cost."""

    def __init__(self, manager) -> None:
        self.hook = manager.hook

    def ask(self, layer, ask_retain: bool, checks: list):
        scores = self.hook.score(layer=layer)
        keep = self.hook.retain(layer=layer, scores=scores) if ask_retain else None
        propagated = self.hook.propagate(layer=layer, scores=scores)
        restart = bool(self.hook.restart(layer=layer)) if propagated is not None else False
        return keep, propagated, restart


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny 32-layer model (CPU-sized)")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = load_model(args.tiny)
    pipe = pipeline(model, "fastkv", **FASTKV)
    checked, unchecked = pipe._hooks, UncheckedHooks(pipe.plugin_manager)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0)
    )
    seconds: dict[str, list[float]] = {"checked": [], "unchecked": []}
    pipe.compress(ids)  # warm-up
    for _ in range(args.repeats):
        for name, hooks in (("checked", checked), ("unchecked", unchecked)):
            pipe._hooks = hooks
            start = time.perf_counter()
            pipe.compress(ids)  # its prefill synchronises the device before it returns
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    minima = {name: min(values) for name, values in seconds.items()}
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "length": args.length,
        "tiny": args.tiny,
        "seconds": seconds,
        "median_s": medians,
        "min_s": minima,
        "overhead_pct_median": 100 * (medians["checked"] / medians["unchecked"] - 1),
        "overhead_pct_min": 100 * (minima["checked"] / minima["unchecked"] - 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"contract_cost_{args.length}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
