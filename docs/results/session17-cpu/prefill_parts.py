"""Each prefill part's seconds and the graphs torch.compile makes for it, on CPU: a tiny model,
FastKV's compiled prefill (the benchmarks' settings), one row a part, after a warm-up on the first
row, as ``throughput.py`` runs a batch. Run with ``TORCH_LOGS=recompiles`` to see every recompile.

    cd docs/results/session17-cpu
    TORCH_LOGS=recompiles python prefill_parts.py > prefill_parts.txt 2>&1
"""

import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from speed import SYSTEMS, load_model

from kvpress_like import pipeline

model = load_model(tiny=True)
strategy, settings = SYSTEMS["fastkv"]
pipe = pipeline(model, strategy, max_new_tokens=2, stop_on_eos=False, prefill_rows=1, **settings)
ids = torch.randint(3, model.config.vocab_size, (6, 512), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
pipe.compress(ids[:1])
graphs = counters["stats"]["unique_graphs"]
print(f"warm-up part (compiles): {time.perf_counter() - start:.1f} s, graphs {graphs}")
prefill_rows = pipe._prefill_rows


def timed(*args, **kwargs):
    graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
    context = prefill_rows(*args, **kwargs)
    print(
        f"part: {time.perf_counter() - start:.2f} s, new graphs {counters['stats']['unique_graphs'] - graphs}"
    )
    return context


pipe._prefill_rows = timed
pipe.compress(ids)
