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
from kvpress_like.eval.report import summary_table
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
         "--fidelity-steps", "3", "--max-new-tokens", "6", "--no-plots", "--batch", "2"]
    )  # fmt: skip
    assert args.func is eval_cli.run_eval and args.budgets == [0.25] and args.lengths == [700]
    assert args.batch == 2 and args.haystack == "essays"
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


def test_a_batch_gives_each_sample_the_record_it_has_alone(tmp_path):
    """batch=3 runs the samples as rows of one left-padded call; every record equals the one of
    the sample run alone (batch=1), in fp32 on the CPU: scores, predictions, kept entries, KL."""
    model = tiny_model("llama")
    settings = dict(
        strategies=["full", "fastkv", "snapkv", "h2o", "adakv"],
        budgets=[0.2],
        tasks=["niah_multikey", "fidelity"],
        lengths=[600],
        samples=3,
        fidelity_steps=4,
        max_new_tokens=6,
        progress=False,
        plots=False,
    )
    alone = evaluate(model, CharTokenizer(), out=tmp_path / "alone", **settings)
    batched = evaluate(model, CharTokenizer(), out=tmp_path / "batched", batch=3, **settings)
    lengths = {r["prompt_tokens"] for r in alone.records}
    assert len(lengths) > 1  # the rows of a batch differ in length: padding is exercised
    assert [r["key"] for r in batched.records] == [r["key"] for r in alone.records]
    for one, row in zip(alone.records, batched.records, strict=True):
        assert (one["batch"], row["batch"]) == (1, 3)
        assert row["status"] == one["status"] == "ok"
        for name in ("score", "prediction", "prompt_tokens", "kv_kept_mean"):
            assert row[name] == one[name], (row["key"], name)
        if one["task"] == "fidelity":
            assert row["kl"] == pytest.approx(one["kl"], abs=1e-5)


def test_a_code_haystack_run_is_keyed_apart_and_a_merged_summary_says_which(tmp_path):
    model = tiny_model("llama")
    settings = dict(strategies=["snapkv"], budgets=[0.3], tasks=["niah_single"], lengths=[700], samples=2)
    essays = evaluate(model, CharTokenizer(), out=tmp_path, progress=False, plots=False, **settings)
    code = evaluate(
        model, CharTokenizer(), out=tmp_path, progress=False, plots=False, haystack="code", **settings
    )
    assert code.computed == 2 and code.reused == 0  # not taken for the essays' records
    assert {r["haystack"] for r in code.records} == {"code"} and all(
        "|hay=code|" in r["key"] for r in code.records
    )
    assert {r["haystack"] for r in essays.records} == {"essays"}
    assert "code haystack" in code.summary and "| haystack |" not in code.summary
    merged = summary_table(essays.records + code.records)
    assert "| haystack | strategy |" in merged
    assert "| essays | snapkv | 0.3 | 700 |" in merged and "| code | snapkv | 0.3 | 700 |" in merged
    with pytest.raises(ValueError, match="haystack"):
        evaluate(
            model, CharTokenizer(), out=tmp_path, progress=False, plots=False, haystack="poems", **settings
        )


def test_runs_split_by_strategy_merge_into_the_single_runs_records_and_summary(tmp_path, capsys):
    from kvpress_like.cli import main

    model = tiny_model("llama")
    common = dict(budgets=[0.2], tasks=["niah_single", "fidelity"], lengths=[600], samples=2,
                  fidelity_steps=3, max_new_tokens=5, progress=False, plots=False)  # fmt: skip
    whole = evaluate(
        model, CharTokenizer(), strategies=["full", "snapkv", "h2o"], out=tmp_path / "whole", **common
    )
    evaluate(model, CharTokenizer(), strategies=["full", "snapkv"], out=tmp_path / "a", **common)
    evaluate(model, CharTokenizer(), strategies=["h2o"], out=tmp_path / "b", **common)

    assert main(["eval-merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    merged = [json.loads(x) for x in (tmp_path / "m/records.jsonl").read_text().splitlines()]
    volatile = ("seconds", "prefill_seconds")
    assert sorted(
        ({k: v for k, v in r.items() if k not in volatile} for r in merged), key=lambda r: r["key"]
    ) == sorted(
        ({k: v for k, v in r.items() if k not in volatile} for r in whole.records), key=lambda r: r["key"]
    )
    assert set((tmp_path / "m/summary.md").read_text().splitlines()) == set(whole.summary.splitlines())
    assert (tmp_path / "m/heatmap_h2o.png").stat().st_size > 1000
    environment = json.loads((tmp_path / "m/environment.json").read_text())
    assert [Path(e["folder"]).name for e in environment["merged_from"]] == ["a", "b"]
    assert "| h2o | 0.2 | 600 |" in capsys.readouterr().out

    # A run made with another dtype is refused before anything is written.
    other = json.loads((tmp_path / "b/environment.json").read_text()) | {"dtype": "bfloat16"}
    (tmp_path / "b/environment.json").write_text(json.dumps(other))
    assert main(["eval-merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "n")]) == 2
    assert "dtype 'float32' vs 'bfloat16'" in capsys.readouterr().err and not (tmp_path / "n").exists()
    assert (
        main(["eval-merge", str(tmp_path / "a"), str(tmp_path / "nothing"), "--out", str(tmp_path / "n")])
        == 2
    )
    assert "records.jsonl" in capsys.readouterr().err

    # A refusal from an earlier run (a bigger batch, say) gives way to a later run's computed record.
    early = tmp_path / "early"
    early.mkdir()
    (early / "environment.json").write_text((tmp_path / "a/environment.json").read_text())
    lines = (tmp_path / "a/records.jsonl").read_text().splitlines()
    refused = {**json.loads(lines[0]), "status": "skipped", "reason": "too big a batch"}
    (early / "records.jsonl").write_text(json.dumps(refused) + "\n")
    assert (
        main(["eval-merge", str(early), str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    )
    merged = [json.loads(x) for x in (tmp_path / "o/records.jsonl").read_text().splitlines()]
    assert next(r for r in merged if r["key"] == refused["key"])["status"] == "ok"


def test_a_rerun_with_another_sample_count_does_not_take_the_old_records(tmp_path):
    """Sample i's depth is i / (samples - 1): with 3 samples #1 sits at 0.5, with 5 at 0.25."""
    settings = dict(strategies=["full"], budgets=[0.2], tasks=["niah_single"], lengths=[500], out=tmp_path,
                    max_new_tokens=3, progress=False, plots=False)  # fmt: skip
    three = evaluate(tiny_model("llama"), CharTokenizer(), samples=3, **settings)
    five = evaluate(tiny_model("llama"), CharTokenizer(), samples=5, **settings)
    assert (five.computed, five.reused) == (5, 0)
    assert [r["depth"] for r in three.records] == [0.0, 0.5, 1.0]
    assert [r["depth"] for r in five.records] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_batch_refused_as_a_whole_is_run_one_sample_at_a_time(tmp_path, monkeypatch):
    """A refusal that depends on the batch (free memory for every row's new tokens) must not skip
    samples that pass alone: here the call check refuses any call of more than one row."""
    import importlib

    from kvpress_like.settings import check_call

    module = importlib.import_module("kvpress_like.pipeline")  # the package exports a function of that name

    def refuse_batches(adapter, prompts, prompt_lengths, call, *rest):
        if prompt_lengths.shape[0] > 1:
            raise ConfigError(
                f"generation.max_new_tokens: too much for {prompt_lengths.shape[0]} rows (got 4)"
            )
        check_call(adapter, prompts, prompt_lengths, call, *rest)

    monkeypatch.setattr(module, "check_call", refuse_batches)
    result = evaluate(tiny_model("llama"), CharTokenizer(), strategies=["snapkv"], budgets=[0.3],
                      tasks=["niah_single"], lengths=[600], samples=3, batch=3, max_new_tokens=4,
                      out=tmp_path, progress=False, plots=False)  # fmt: skip
    assert [r["status"] for r in result.records] == ["ok"] * 3
    assert [r["batch"] for r in result.records] == [1, 1, 1]
