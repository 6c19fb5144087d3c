"""The graphs torch.compile makes for FastKV's compiled prefill as parts of 1, 4 and 4+4 rows first
run (CPU, the benchmarks' tiny model, ``prefill_rows=4``): dynamo specialises a batch of 1, so the
first part of 4 rows compiles the layers again; later batch sizes make none.

    cd docs/results/session17-cpu && python prefill_graphs_per_part_size.py > prefill_graphs_per_part_size.txt
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
pipe = pipeline(model, strategy, max_new_tokens=2, stop_on_eos=False, prefill_rows=4, **settings)
ids = torch.randint(3, model.config.vocab_size, (8, 512), generator=torch.Generator().manual_seed(0))
for rows in (1, 4, 8):
    graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
    pipe.compress(ids[:rows])
    new = counters["stats"]["unique_graphs"] - graphs
    print(f"batch {rows} (parts of up to 4 rows): {time.perf_counter() - start:.1f} s, new graphs {new}")
