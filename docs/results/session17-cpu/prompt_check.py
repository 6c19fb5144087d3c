"""Seconds to check and encode a tensor of token ids, before (commit 3836423: to the host as lists,
each id checked in Python) and after (checked where it lies). CPU, the benchmarks' tiny model.

    cd docs/results/session17-cpu && python prompt_check.py > prompt_check.txt
"""

import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import load_model  # noqa: E402

from kvpress_like.prompts import PromptEncoder  # noqa: E402

old_source = subprocess.run(
    ["git", "-C", str(ROOT), "show", "3836423:kvpress_like/prompts.py"],
    capture_output=True,
    text=True,
    check=True,
).stdout
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
    file.write(old_source)
spec = importlib.util.spec_from_file_location("prompts_before", file.name)
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)

model = load_model(tiny=True)
machine = platform.processor() or platform.machine()
print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
for shape in [(1, 131072), (128, 32768)]:
    ids = torch.randint(3, model.config.vocab_size, shape)
    for name, encoder in (
        ("before", before.PromptEncoder(None, model)),
        ("after", PromptEncoder(None, model)),
    ):
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            out, valid = encoder.encode(ids, "prompt")
            seconds.append(time.perf_counter() - start)
            assert torch.equal(out, ids) and bool(valid.all())
        print(f"{shape[0]} x {shape[1]} ids, {name}: {', '.join(f'{s:.3f}' for s in seconds)} s")
