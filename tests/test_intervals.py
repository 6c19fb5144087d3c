"""The summary's 95% intervals against values computed by hand and against the central limit
theorem, and the environment record that keeps differently made records apart."""

from __future__ import annotations

import json
import math
import random
from statistics import NormalDist

import pytest
import torch

from kvpress_like.errors import ConfigError
from kvpress_like.eval.harness import evaluate
from kvpress_like.eval.intervals import bootstrap_mean, interval, wilson

from conftest import CharTokenizer, tiny_model


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927): the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    z = NormalDist().inv_cdf(0.975)
    a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2  # a p^2 + b p + c = 0
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 4), (4, 4), (25, 50), (49, 50), (1, 1)])
def test_wilson_matches_the_quadratic_solved_by_hand(k, n):
    low, high = wilson(k, n)
    want_low, want_high = _wilson_by_hand(k, n)
    assert low == pytest.approx(max(0.0, want_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, want_high), abs=1e-12)
    assert low <= k / n <= high
    mirrored = wilson(n - k, n)
    assert (low, high) == pytest.approx((1 - mirrored[1], 1 - mirrored[0]), abs=1e-12)


def test_wilson_textbook_value():
    assert wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)  # the "rule of three"'s neighbour


def test_bootstrap_agrees_with_the_normal_approximation_for_a_large_sample():
    rng = random.Random(1)
    values = [rng.expovariate(1.0) for _ in range(400)]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = NormalDist().inv_cdf(0.975) * sd / math.sqrt(len(values))
    low, high = bootstrap_mean(values)
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_mean(values) == (low, high)  # seeded
    assert bootstrap_mean([0.25] * 9) == (0.25, 0.25)


def test_interval_picks_wilson_for_accuracies_only():
    assert interval([1, 0, 1, 1]) == wilson(3, 4)
    assert interval([0.5, 1.0, 0.0]) == bootstrap_mean([0.5, 1.0, 0.0])


def _run(out, model):
    return evaluate(
        model, CharTokenizer(), strategies=["full"], budgets=[0.1], tasks=["passkey"], lengths=[300],
        samples=2, out=out, model_name="tiny-llama", max_new_tokens=4, progress=False, plots=False,
    )  # fmt: skip


def test_records_of_another_dtype_are_not_mixed_in(tmp_path):
    result = _run(tmp_path, tiny_model("llama"))
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["dtype"] == "float32" and env["device_type"] == "cpu" and env["model"] == "tiny-llama"
    assert {"commit", "library_version", "torch", "transformers"} <= set(env)
    assert "[" in result.summary and "95% intervals" in result.summary
    with pytest.raises(ConfigError, match=r"--out: .*dtype 'float32', here 'bfloat16'"):
        _run(tmp_path, tiny_model("llama").to(torch.bfloat16))
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2  # nothing added


def test_fidelity_cells_get_the_bootstrap_even_when_every_value_is_0_or_1():
    """Top-1 agreement and KL are means of per-step values, not accuracies: a full cache's 1.0 and
    0.0 are certain, where Wilson's interval for 3 successes of 3 would reach down to 0.44."""
    from kvpress_like.eval.report import summary_table

    base = {"strategy": "full", "budget": None, "length": 64, "status": "ok"}
    records = [{**base, "task": "passkey", "sample": i, "score": 1.0} for i in range(3)]
    records += [{**base, "task": "fidelity", "sample": i, "score": 1.0, "kl": 0.0} for i in range(3)]
    row = summary_table(records).splitlines()[2]
    low, _ = wilson(3, 3)
    assert row.split(" | ")[3:6] == [
        f"1.00 [{low:.2f}, 1.00]",
        "1.00 [1.00, 1.00]",
        "0.0000 [0.0000, 0.0000]",
    ]


def test_summary_rows_group_strategies_with_budgets_and_lengths_ascending_in_any_record_order():
    """Runs merged from workers interleave strategies and lengths; the table does not."""
    from kvpress_like.eval.report import summary_table

    cells = [("snapkv", 0.2, 2048), ("full", None, 2048), ("snapkv", 0.1, 1024), ("snapkv", 0.2, 1024),
             ("full", None, 1024), ("snapkv", 0.1, 2048)]  # fmt: skip
    base = {"status": "ok", "task": "passkey", "sample": 0, "score": 1.0}
    records = [{**base, "strategy": s, "budget": b, "length": n} for s, b, n in cells]
    rows = [line.split(" | ")[:3] for line in summary_table(records).splitlines()[2:8]]
    assert rows == [
        ["| snapkv", "0.1", "1024"],
        ["| snapkv", "0.1", "2048"],
        ["| snapkv", "0.2", "1024"],
        ["| snapkv", "0.2", "2048"],
        ["| full", "—", "1024"],
        ["| full", "—", "2048"],
    ]


def test_a_resumed_run_keeps_the_environment_of_the_records_before_it(tmp_path, monkeypatch):
    from kvpress_like.eval import environment

    model = tiny_model("llama")
    _run(tmp_path, model)
    first = json.loads((tmp_path / "environment.json").read_text())
    _run(tmp_path, model)  # the same environment: nothing to keep
    assert json.loads((tmp_path / "environment.json").read_text()) == first
    monkeypatch.setattr(environment, "_commit", lambda: "another")
    (tmp_path / "records.jsonl").write_text("")  # records to compute again, with the other library
    _run(tmp_path, model)
    now = json.loads((tmp_path / "environment.json").read_text())
    assert now["commit"] == "another" and now["earlier"] == [first]
