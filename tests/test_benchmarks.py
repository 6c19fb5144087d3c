"""The speed benchmark runs end to end (tiny random model, CPU) and writes its JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "speed.py"


def test_speed_benchmark_smoke_run(tmp_path):
    command = [
        sys.executable,
        str(SCRIPT),
        "--tiny",
        "--cases",
        "96x1",
        "--steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run([*command, "--systems", "transformers,fastkv"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "speed.json").read_text())
    records = result["records"]
    assert result["meta"]["complete"] and result["meta"]["device"] == "cpu"
    assert [r["system"] for r in records] == ["transformers", "fastkv"]
    for record in records:
        assert "error" not in record, record
        assert record["prefill_s"] > 0 and record["decode_ms"] > 0 and record["steps"] == 3
        assert record["first_call_s"] >= record["prefill_s"]
    assert records[1]["kv_kept_per_layer"][0] == round(0.1 * 96)
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "fastkv" in done.stdout.splitlines()[-1]


def test_speed_benchmark_rejects_an_unknown_system_before_any_work(tmp_path):
    command = [sys.executable, str(SCRIPT), "--tiny", "--systems", "fastkv,fastkvv", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--systems" in done.stderr and "fastkvv" in done.stderr
    assert not (tmp_path / "speed.json").exists()
