"""The accuracy harness: budgets to settings, a tiny smoke run, resuming, the CLI entry points."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress_like.errors import ConfigError
from kvpress_like.eval import cli as eval_cli
from kvpress_like.eval.cli import add_eval_parser
from kvpress_like.eval.harness import StrategySpec, evaluate
from kvpress_like.pipeline import Pipeline

from conftest import CharTokenizer, tiny_model

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "accuracy.py"


def test_strategy_specs_and_budgets():
    fastkv = StrategySpec.parse("fastkv")
    assert fastkv.settings_for(0.1) == {"retain_rate": 0.1, "tsp_rate": 0.2}
    assert fastkv.settings_for(0.5) == {"retain_rate": 0.5, "tsp_rate": 0.5}
    pinned = StrategySpec.parse("fastkv:tsp=0.3:window=4")
    assert pinned.settings_for(0.1) == {"retain_rate": 0.1, "tsp_rate": 0.3, "window": 4}
    assert pinned.label == "fastkv:tsp=0.3:window=4"
    for name in ("snapkv", "streamingllm", "gemfilter", "h2o", "pyramidkv", "adakv"):
        assert StrategySpec.parse(name).settings_for(0.2) == {"retain_rate": 0.2}
    assert StrategySpec.parse("full").settings_for(0.2) == {}
    assert StrategySpec.parse("snapkv:pooling=avg").settings == {"pooling": "avg"}
    with pytest.raises(ConfigError):
        StrategySpec.parse("snapkv:window")


TASKS = ["passkey", "niah_single", "niah_multivalue", "vt", "fidelity"]
STRATEGIES = ["full", "fastkv", "snapkv:window=100"]  # snapkv's window exceeds 10% of 700 tokens


def _run(out, **kw):
    return evaluate(
        tiny_model("llama"),
        CharTokenizer(),
        strategies=STRATEGIES,
        budgets=[0.1, 0.5],
        tasks=TASKS,
        lengths=[700, 900],
        samples=2,
        seed=0,
        out=out,
        model_name="tiny-llama",
        fidelity_steps=4,
        max_new_tokens=8,
        progress=False,
        **kw,
    )


def test_smoke_run_writes_records_summary_and_plots_then_resumes(tmp_path, monkeypatch):
    result = _run(tmp_path)
    runs = 1 + 2 + 2  # full once, fastkv and snapkv at each budget
    total = len(TASKS) * 2 * 2 * runs
    assert (result.computed, result.reused) == (total, 0)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == total == len({r["key"] for r in records})

    ok = [r for r in records if r["status"] == "ok"]
    skipped = [r for r in records if r["status"] == "skipped"]
    assert {r["strategy"] for r in skipped} == {"snapkv:window=100"}
    assert {r["budget"] for r in skipped} == {0.1}
    assert all("window" in r["reason"] for r in skipped)
    assert all(0.0 <= r["score"] <= 1.0 for r in ok)
    for r in ok:
        if r["task"] == "fidelity" and r["strategy"] == "full":
            assert r["score"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-5)
        if r["strategy"] == "fastkv":
            assert r["settings"]["tsp_rate"] == max(r["budget"], 0.2)
            assert r["kv_kept_share"] < 0.6
    assert {r["budget"] for r in ok if r["strategy"] == "full"} == {None}

    summary = (tmp_path / "summary.md").read_text()
    assert summary == result.summary
    assert "| strategy | budget | length |" in summary and "fidelity KL" in summary
    assert "| fastkv | 0.1 | 700 |" in summary
    for name in ("accuracy_vs_budget.png", "heatmap_full.png", "heatmap_fastkv.png"):
        assert (tmp_path / name).stat().st_size > 1000

    # Rerun: every record is found, no model work at all.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished record was recomputed")

    monkeypatch.setattr(Pipeline, "_prefill", refuse)
    again = _run(tmp_path, plots=False)
    assert (again.computed, again.reused) == (0, total)
    assert (tmp_path / "records.jsonl").read_text().splitlines() == lines
    assert again.summary == result.summary
    monkeypatch.undo()

    # An interrupted run (the last records lost, one line cut short) redoes only what is missing.
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    prefills = []
    original = Pipeline._prefill
    monkeypatch.setattr(Pipeline, "_prefill", lambda self, *a: prefills.append(1) or original(self, *a))
    resumed = _run(tmp_path, plots=False)
    assert (resumed.computed, resumed.reused) == (3, total - 3)
    assert 3 <= len(prefills) <= 4  # fidelity also prefills the full reference once


def test_cli_parser_and_run_eval(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["eval", "--model", "tiny", "--strategies", "full,fastkv:tsp=0.3", "--budgets", "0.25",
         "--lengths", "700", "--tasks", "passkey,fidelity", "--samples", "1", "--out", str(tmp_path),
         "--fidelity-steps", "3", "--max-new-tokens", "6", "--no-plots"]
    )  # fmt: skip
    assert args.func is eval_cli.run_eval and args.budgets == [0.25] and args.lengths == [700]
    import kvpress_like.models

    monkeypatch.setattr(
        kvpress_like.models, "load_model", lambda name: (tiny_model("llama"), CharTokenizer())
    )
    result = eval_cli.run_eval(args)
    assert result.computed == 2 * 2
    assert "| fastkv:tsp=0.3 | 0.25 | 700 |" in capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"tiny"}
    assert next(r["settings"] for r in records if r["strategy"] != "full") == {
        "retain_rate": 0.25,
        "tsp_rate": 0.3,
    }


def test_unknown_task_and_strategy_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="tasks"):
        evaluate(None, CharTokenizer(), strategies=["full"], budgets=[0.1], tasks=["nope"], out=tmp_path)
    result = evaluate(
        tiny_model("llama"),
        CharTokenizer(),
        strategies=["nonesuch"],
        budgets=[0.1],
        tasks=["passkey"],
        lengths=[500],
        samples=1,
        out=tmp_path,
        progress=False,
        plots=False,
    )
    assert [r["status"] for r in result.records] == ["skipped"]
    assert "nonesuch" in result.records[0]["reason"]


def test_benchmark_script_is_the_same_cli():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--strategies" in done.stdout and "--budgets" in done.stdout
