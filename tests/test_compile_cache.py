"""torch.compile artifacts in a file: a fresh process that loads them compiles the decode step from
the saved graphs (inductor's cache hits, no misses) where the process that made them compiled from
scratch; bad files are refused naming the setting; ``kvpress-like warmup`` writes the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress_like import compile_cache, pipeline
from kvpress_like.errors import ConfigError

from conftest import tiny_model

TESTS = Path(__file__).parent

# A fresh interpreter with its own empty inductor cache folder: what it reuses comes from the file.
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from torch._dynamo.utils import counters
from kvpress_like import compile_cache, pipeline
from conftest import random_rows, tiny_model
mode, path = sys.argv[1], sys.argv[2]
pipe = pipeline(tiny_model("llama"), "full", decode="compiled", max_new_tokens=4, stop_on_eos=False,
                compile_cache=path if mode == "load" else None)
tokens = pipe(random_rows([30, 41], seed=2)).token_ids
if mode == "save":
    compile_cache.save(path)
inductor = counters["inductor"]
hits, misses = inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]
print(json.dumps({{"tokens": tokens, "hits": hits, "misses": misses}}))
"""


def _fresh_process(tmp_path: Path, mode: str, artifacts: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{mode}")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=str(TESTS)), mode, str(artifacts)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fresh_process_compiles_the_step_from_the_saved_artifacts(tmp_path):
    artifacts = tmp_path / "decode.compile"
    saved = _fresh_process(tmp_path, "save", artifacts)  # an empty inductor cache: from scratch
    assert artifacts.stat().st_size > 0 and saved["hits"] == 0 and saved["misses"] >= 1
    loaded = _fresh_process(tmp_path, "load", artifacts)  # another empty one, and the file
    assert loaded["hits"] >= 1 and loaded["misses"] == 0
    assert loaded["tokens"] == saved["tokens"]


def test_a_missing_file_compiles_from_scratch_and_a_foreign_one_is_refused(tmp_path, caplog):
    assert compile_cache.load(tmp_path / "not-yet.compile") is False
    foreign = tmp_path / "foreign.compile"
    foreign.write_bytes(b"not torch.compile artifacts")
    with pytest.raises(
        ConfigError, match=r"compile_cache: must be a file written by `kvpress-like warmup`.*foreign"
    ):
        pipeline(tiny_model("llama"), "full", compile_cache=str(foreign))


def test_warmup_writes_the_artifacts_of_each_batch_size(tmp_path, monkeypatch, capsys, fresh_dynamo):
    import kvpress_like.models
    from kvpress_like.cli import main

    monkeypatch.setattr(kvpress_like.models, "load_model", lambda name: (tiny_model("llama"), None))
    out = tmp_path / "decode.compile"
    assert main(["warmup", "-o", str(out), "--model", "tiny", "--strategy", "snapkv", "--batches", "1,2",
                 "--prompt-tokens", "100"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "batch 1: first calls" in printed and "batch 2: first calls" in printed
    assert out.stat().st_size > 0 and f"compile_cache={str(out)!r}" in printed
    assert main(["warmup", "-o", str(tmp_path), "--model", "tiny"]) == 2  # a folder, not a file
