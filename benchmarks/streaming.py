"""What streaming costs in decode, and what ``Pipeline.close()`` gives back.

One process, one Llama-3.1-8B-shaped random model (``speed.load_model``), FastKV defaults, a
``--length``-token prompt compressed once; then, alternated ``--repeats`` times on the same
compiled decode step: no streamer, a streamer (the transformers protocol, ``put``/``end``, doing
no work of its own, so that what is measured is the pipeline's side) and an ``on_token`` callback.
Median decode ms/token of each, by CUDA events. Then GPU memory allocated: the weights alone, after
the calls, and after ``close()`` (plus ``gc.collect()`` and ``torch.cuda.empty_cache()``).

    python benchmarks/streaming.py --length 32768 --steps 128 --out results/
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch
from speed import FASTKV, load_model

from kvpress_like import pipeline


class NullStreamer:
    """transformers' streamer protocol, counting what it is handed and nothing more."""

    def __init__(self) -> None:
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        self.tokens += value.numel()

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    model = load_model(args.tiny)
    weights = torch.cuda.memory_allocated() if cuda else 0
    pipe = pipeline(model, "fastkv", max_new_tokens=args.steps, stop_on_eos=False, **FASTKV)
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0)
    )
    context = pipe.compress(ids)
    pipe.generate(context=context)  # compiles the decode step
    calls = {
        "none": dict,
        "streamer": lambda: {"streamer": NullStreamer()},
        "on_token": lambda: {"on_token": lambda tokens: None},
    }
    ms: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, options in calls.items():
            out = pipe.generate(context=context, **options())
            ms[name].append(1e3 * out.stats.decode_seconds_per_token)
    held = torch.cuda.memory_allocated() if cuda else 0
    pipe.close()
    del context, out
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    after_close = torch.cuda.memory_allocated() if cuda else 0
    gib = 2**30
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "length": args.length,
        "steps": args.steps,
        "decode_ms_per_token": ms,
        "median_ms": {name: statistics.median(v) for name, v in ms.items()},
        "gib_weights": weights / gib,
        "gib_before_close": held / gib,
        "gib_after_close": after_close / gib,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "decode_ms_per_token"}, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "streaming.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
