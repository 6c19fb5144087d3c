"""The speed benchmark runs end to end (tiny random model, CPU) and writes its JSON and plot."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import torchrun

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
    assert records[1]["prefill_s"] > records[1]["model_prefill_s"] > 0  # the call's, the layers'
    assert records[1]["kv_kept_per_layer"][0] == round(0.1 * 96)
    assert (tmp_path / "speed.png").stat().st_size > 0
    table = done.stdout[done.stdout.index("prefill s") :]
    assert "fastkv" in table and "targets: not checked" in table  # no 128K case in a smoke run


def test_targets_say_which_are_met_and_by_how_much_the_others_miss():
    speed = _load_speed_module()

    def record(system, prefill_s, decode_ms, **extra):
        return {"system": system, "length": 131072, "batch": 1, "prefill_s": prefill_s,
                "decode_ms": decode_ms, **extra}  # fmt: skip

    records = [
        record("transformers", 10.0, 50.0, peak_gib=45.0),
        record("fastkv", 5.5, 4.0, peak_gib=23.1),
        {"system": "fastkv", "length": 32768, "batch": 1, "prefill_s": 1.0, "decode_ms": 99.0},
    ]
    rows = {row["target"]: row for row in speed.check_targets(records, 550.0)}
    # by hand: 4.0 <= 5.0; 50 / 4 = 12.5 >= 10; 10 / 5.5 = 1.818 < 2.0 (miss 9.1%); 23.1 > 22 (5%)
    assert rows["FastKV decode"]["met"] and rows["FastKV decode vs transformers"]["reached"] == 12.5
    assert not rows["FastKV prefill vs transformers"]["met"]
    assert rows["FastKV prefill vs transformers"]["rule"] == ">= 2 x"
    assert abs(rows["FastKV prefill vs transformers"]["missed_by"] - (2.0 - 10 / 5.5) / 2.0) < 1e-12
    assert not rows["FastKV peak GPU memory"]["met"]
    assert abs(rows["FastKV peak GPU memory"]["missed_by"] - 0.05) < 1e-12
    assert rows["whole benchmark run"]["met"] and rows["whole benchmark run"]["missed_by"] == 0.0
    assert speed.check_targets(records[1:], 550.0) == []  # no baseline at 128K: nothing to check


def _load_benchmark(script: str, name: str):
    """benchmarks/<script> as a module named ``name`` (it puts benchmarks/ on the path for its own
    imports)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_speed_module():
    return _load_benchmark("speed.py", "speed_benchmark")


@pytest.fixture(scope="module")
def throughput():
    return _load_benchmark("throughput.py", "throughput")


def test_speed_benchmark_rejects_an_unknown_system_before_any_work(tmp_path):
    command = [sys.executable, str(SCRIPT), "--tiny", "--systems", "fastkv,fastkvv", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--systems" in done.stderr and "fastkvv" in done.stderr
    assert not (tmp_path / "speed.json").exists()


def test_contexts_benchmark_smoke_run(tmp_path):
    script = SCRIPT.with_name("contexts.py")
    command = [sys.executable, str(script), "--model", "tiny", "--lengths", "128", "--repeats", "1"]
    done = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "contexts.json").read_text())
    assert [r["strategy"] for r in rows] == ["full", "fastkv", "snapkv"]
    full, fastkv, _ = rows
    # a full cache's file holds every key and value, FastKV's (retain_rate 0.1) about a tenth
    assert full["file_bytes"] > full["cache_bytes_full"] > 5 * fastkv["file_bytes"]
    assert all(r["load_s"] > 0 and r["save_s"] > 0 for r in rows)


def test_tensor_parallel_benchmark_smoke_run(tmp_path):
    """Two gloo ranks on a tiny shape: kvpress_like and transformers' own sharded forward; one
    process; the report's tables from both."""
    script = SCRIPT.with_name("tensor_parallel.py")
    case = ["--shape", "tiny", "--lengths", "128", "--decode", "static", "--steps", "3"]
    case += ["--out", str(tmp_path)]
    done = subprocess.run(
        [*torchrun(2), str(script), *case, "--systems", "fastkv,transformers"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "tp-tiny-2gpu.json").read_text())["rows"]
    assert [(r["system"], r["gpus"]) for r in rows] == [("fastkv", 2), ("transformers", 2)]
    fastkv, full = rows
    assert fastkv["kept_cache_bytes"] < full["kept_cache_bytes"] / 5  # retain_rate 0.1, per rank
    assert all(r["prefill_s"] > 0 and r["decode_ms"] > 0 for r in rows)
    one = subprocess.run(  # the same case in one process: the report's speed-up over one GPU
        [sys.executable, str(script), *case, "--systems", "fastkv"],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    (single,) = json.loads((tmp_path / "tp-tiny-1gpu.json").read_text())["rows"]
    table = subprocess.run(
        [sys.executable, str(script), "--report", str(tmp_path)], capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr[-2000:]
    cells = [line.split(" | ") for line in table.stdout.splitlines() if line.startswith("| tiny")]
    results, scaling = cells[:3], cells[3:]
    assert [(c[1], c[3]) for c in results] == [("1", "fastkv"), ("2", "fastkv"), ("2", "transformers")]
    assert [float(c[5]) for c in results] == [round(r["decode_ms"], 2) for r in (single, *rows)]
    (speedup,) = scaling  # fastkv on 2 ranks against 1
    assert float(speedup[5].rstrip("x")) == round(single["decode_ms"] / fastkv["decode_ms"], 2)
    assert (tmp_path / "tp.png").stat().st_size > 0


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args`` in a fresh interpreter, which must succeed."""
    command = [sys.executable, str(SCRIPT.parent / script), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_throughput_benchmark_smoke_run(tmp_path):
    done = run_benchmark(
        "throughput.py", "--tiny", "--length", "80", "--batches", "1,2", "--steps", "2",
        "--prefill-rows", "1", "--systems", "fastkv", "--out", str(tmp_path),
        "--set", "decode.KEPT_DECODERS=3",
    )  # fmt: skip
    result = json.loads((tmp_path / "throughput-80.json").read_text())
    assert result["meta"]["complete"] and result["meta"]["allocator"] == "expandable_segments:True"
    assert result["meta"]["settings"] == ["decode.KEPT_DECODERS=3"]
    assert [(r["system"], r["batch"]) for r in result["records"]] == [("fastkv", 1), ("fastkv", 2)]
    for record in result["records"]:
        assert "error" not in record, record
        assert record["steps"] == 2 and record["start_s"] > 0 and record["tokens_per_s"] > 0
        # a part per row, whose seconds add up to the batch's prefill in the layers, which the
        # time to the first token (prompt checks, joining the parts, loading the buffers) exceeds
        assert len(record["prefill_part_s"]) == record["batch"]
        assert sum(record["prefill_part_s"]) == pytest.approx(record["model_prefill_s"])
        assert record["prefill_s"] > record["model_prefill_s"]
    assert (tmp_path / "throughput-80.png").stat().st_size > 0
    assert "tokens/s" in done.stdout


def test_throughput_join_puts_runs_into_one_table_and_plot(tmp_path):
    """Each system's run, written apart, joined in the order given; runs at two lengths refused."""

    def run(system: str, length: int, batches: list[int]) -> Path:
        path = tmp_path / system / f"throughput-{length}.json"
        path.parent.mkdir(exist_ok=True)
        records = [
            dict(system=system, length=length, batch=b, prefill_s=0.5 * b, decode_ms=4.0 + b,
                 tokens_per_s=1000 * b / (4.0 + b), decode_floor_ms=3.5, decode_vs_floor=(4.0 + b) / 3.5,
                 peak_gib=16.0 + b, start_s=20.0)
            for b in batches
        ]  # fmt: skip
        path.write_text(json.dumps({"meta": {"command": system}, "records": records}))
        return path

    fastkv, transformers = run("fastkv", 80, [1, 8, 244]), run("transformers", 80, [1, 8])
    out = tmp_path / "joined"
    done = run_benchmark("throughput.py", "--join", str(fastkv), str(transformers), "--out", str(out))
    joined = json.loads((out / "throughput-80-joined.json").read_text())
    assert [m["file"] for m in joined["meta"]["joined"]] == [str(fastkv), str(transformers)]
    expected = [("fastkv", 1), ("fastkv", 8), ("fastkv", 244), ("transformers", 1), ("transformers", 8)]
    assert [(r["system"], r["batch"]) for r in joined["records"]] == expected
    printed = [
        line.split()[:2]
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["fastkv"], ["transformers"])
    ]
    assert [(system, int(batch)) for system, batch in printed] == expected
    assert (out / "throughput-80-joined.png").stat().st_size > 0
    refused = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "throughput.py"), "--join", str(fastkv),
         str(run("transformers", 96, [1])), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--join: the runs must share one context length, got [80, 96]" in refused.stderr


def test_paired_benchmark_smoke_run(tmp_path):
    """Both variants decode the same context in alternating rounds; the ratio is of their medians."""
    args = ["--tiny", "--length", "80", "--batch", "2", "--steps", "2", "--rounds", "3"]
    args += ["--out", str(tmp_path)]
    done = run_benchmark("ab.py", *args, "--b", "decode.KEPT_DECODERS=3")
    result = json.loads((tmp_path / "ab-80x2.json").read_text())
    assert result["settings"] == {"a": [], "b": ["decode.KEPT_DECODERS=3"]}
    ms = result["ms_per_step"]
    assert len(ms["a"]) == len(ms["b"]) == 3 and min(ms["a"] + ms["b"]) > 0
    assert result["b_over_a"] == pytest.approx(sorted(ms["b"])[1] / sorted(ms["a"])[1])
    assert "B / A" in done.stdout
    refused = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "ab.py"), *args, "--b", "decode.KEPT_DECODER=3"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "kvpress_like.decode has no KEPT_DECODER" in refused.stderr


def test_throughput_benchmark_sets_only_constants_the_library_has(throughput, monkeypatch):
    from kvpress_like import decode

    monkeypatch.setattr(decode, "KEPT_DECODERS", decode.KEPT_DECODERS)  # restored after the test
    throughput.override("decode.KEPT_DECODERS=7")
    assert decode.KEPT_DECODERS == 7
    with pytest.raises(SystemExit, match=r"kvpress_like\.decode has no KEPT_DECODER$"):
        throughput.override("decode.KEPT_DECODER=7")
    with pytest.raises(SystemExit, match="must be a Python literal"):
        throughput.override("decode.OWN_GRAPHS=always")
    with pytest.raises(SystemExit, match=r"no module kvpress_like\.decoder$"):
        throughput.override("decoder.KEPT_DECODERS=7")


@settings(max_examples=150, deadline=None)
@given(
    small=st.integers(1, 64),
    step=st.integers(1, 64),
    phases=st.lists(st.tuples(st.floats(1, 40), st.floats(0.1, 4)), min_size=1, max_size=2),
    capacity=st.floats(20, 200),
    multiple=st.integers(1, 8),
    out_of_memory_gap=st.one_of(st.none(), st.integers(1, 400)),
)
def test_the_largest_batch_search_proposes_the_largest_batch_its_lines_let_fit(
    throughput, small, step, phases, capacity, multiple, out_of_memory_gap
):
    """Against a brute-force walk over batch sizes: with each phase's peak on a line of its own
    (weights and working set, GiB per row), the search proposes the largest multiple of the
    prefill's rows whose peaks all stay within the capacity (and, below a batch that ran out of
    memory, within the lower half of the interval), or nothing if no batch at least 1/16 larger
    than the best that fitted qualifies."""
    best = small + step
    peaks = lambda batch: [Fraction(fixed) + Fraction(per_row) * batch for fixed, per_row in phases]  # noqa: E731
    fitted = [(b, tuple(float(p) for p in peaks(b))) for b in (small, best)]
    out_of_memory = None if out_of_memory_gap is None else best + out_of_memory_gap
    allowed = [
        batch
        for batch in range(multiple, 2200, multiple)
        if max(peaks(batch)) <= Fraction(capacity)
        and (out_of_memory is None or 2 * batch <= best + out_of_memory)
    ]
    expected = max(allowed, default=None)
    expected = expected if expected is not None and 16 * expected >= 17 * best else None  # MIN_GAIN
    # the float lines and the exact ones may round a batch right at the capacity either way
    edge = any(abs(float(p) - capacity) < 1e-6 for b in range(multiple, 2200, multiple) for p in peaks(b))
    assume(not edge)
    assert throughput.next_largest(fitted, out_of_memory, capacity, multiple) == expected


def test_the_largest_batch_search_ends_once_its_proposal_fits(throughput):
    first = throughput.next_largest([(8, (24.0,)), (16, (28.0,))], None, 100.0, 4)  # 0.5 GiB a row
    assert first == 160
    assert throughput.next_largest([(8, (24.0,)), (16, (28.0,)), (first, (100.0,))], None, 100.0, 4) is None
    # room for 164 rows, 2.5% more than 160: not worth another prefill of minutes
    assert throughput.next_largest([(16, (28.0,)), (first, (97.0,))], None, 100.0, 4) is None
    assert throughput.next_largest([(16, (28.0,)), (first, (97.0,))], None, 104.0, 4) == 172
    with pytest.raises(ValueError, match="needs two batch sizes that decode"):
        throughput.next_largest([(8, (24.0,))], None, 100.0, 4)


def test_the_largest_batch_search_fits_each_phase_of_the_h200_runs(throughput):
    """Session 16's H200 peaks at 32K x16 and x64 (GiB, prefill and decode): the decode's buffers
    grow faster per row than the prefill's kept entries, so the decode's line sets the proposal;
    the records give their phases, a record without them its whole call's peak."""
    x16 = {"prefill_peak_gib": 27.68, "decode_peak_gib": 22.42, "peak_gib": 27.68}
    x64 = {"prefill_peak_gib": 47.26, "decode_peak_gib": 44.72, "peak_gib": 47.26}
    fitted = [(16, throughput.phase_peaks(x16)), (64, throughput.phase_peaks(x64))]
    decode_line = 64 + (128.6 - 44.72) / ((44.72 - 22.42) / 48)
    assert throughput.next_largest(fitted, None, 128.6, 4) == int(decode_line) // 4 * 4 == 244
    assert throughput.phase_peaks({"peak_gib": 9.5}) == (9.5,)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tiny", "--batches", "1,2"], "--largest: .*needs CUDA, not --tiny"),
        (["--batches", "8"], r"--largest: needs at least two --batches .*\[8\]"),
    ],
)
def test_the_largest_batch_search_is_refused_before_any_work(
    throughput, monkeypatch, capsys, arguments, message
):
    monkeypatch.setattr(throughput.torch.cuda, "is_available", lambda: True)  # the rule, not the machine
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--largest", *arguments])
    monkeypatch.setattr(throughput, "run_child", lambda *a, **k: pytest.fail("a measuring process started"))
    with pytest.raises(SystemExit):
        throughput.main()
    assert re.search(message, capsys.readouterr().err)
