"""Threads: calls on one pipeline from several threads give the answers each would alone, and a
plain ``model.generate`` beside them is neither disturbed nor changed afterwards.

References are computed first, one call at a time; the threads then run the same calls at once,
many times over, so that any state shared between calls (on the model or on the pipeline) would
show up as a crash, a wrong answer or a changed model.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvpress_like import pipeline

from conftest import TINY_FASTKV, random_rows, tiny_model

ROUNDS = 6


def _run_together(jobs: list, rounds: int = ROUNDS) -> list:
    """Each job ``rounds`` times, all of them at once from their own threads (started together)."""
    barrier = threading.Barrier(len(jobs))

    def worker(job):
        barrier.wait()
        return [job() for _ in range(rounds)]

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(worker, job) for job in jobs]]


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_threads_on_one_pipeline_get_their_own_answers(decode):
    model = tiny_model("llama")
    pipe = pipeline(model, "fastkv", max_new_tokens=5, stop_on_eos=False, decode=decode, **TINY_FASTKV)
    prompts = [random_rows([n], seed=n)[0] for n in (30, 41, 52, 63)]
    expected = [pipe(p).token_ids for p in prompts]
    results = _run_together([lambda p=p: pipe(p).token_ids for p in prompts])
    for want, got in zip(expected, results, strict=True):
        assert got == [want] * ROUNDS


def test_compress_and_questions_from_threads_share_one_context():
    model = tiny_model("qwen3")
    pipe = pipeline(model, "fastkv", max_new_tokens=4, stop_on_eos=False, **TINY_FASTKV)
    context = pipe.compress(random_rows([48], seed=1))
    questions = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    expected = [pipe.generate([q], context=context).token_ids for q in questions]
    results = _run_together([lambda q=q: pipe.generate([q], context=context).token_ids for q in questions])
    for want, got in zip(expected, results, strict=True):
        assert got == [want] * ROUNDS


def test_model_generate_runs_beside_pipeline_calls_and_the_model_is_unchanged_after():
    model = tiny_model("gemma3")
    attn_before = model.config._attn_implementation
    prompt = torch.tensor(random_rows([35], seed=9))
    reference = model.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist()
    pipe = pipeline(model, "fastkv", max_new_tokens=5, **TINY_FASTKV)
    pipe_prompt = random_rows([44], seed=2)
    pipe_reference = pipe(pipe_prompt).token_ids

    def plain():
        return model.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist()

    plain_results, pipe_results, more = _run_together(
        [plain, lambda: pipe(pipe_prompt).token_ids, lambda: pipe(pipe_prompt).token_ids]
    )
    assert plain_results == [reference] * ROUNDS
    assert pipe_results == more == [pipe_reference] * ROUNDS
    assert model.config._attn_implementation == attn_before
    assert plain() == reference
    assert not [name for m in model.modules() for name in vars(m) if name == "forward"]


def test_a_pipeline_call_changes_nothing_on_the_model_while_it_runs():
    """What another thread would read while a call is in the middle of prefill."""
    from kvpress_like import hookimpl

    model = tiny_model("llama")
    seen = []

    class Observer:
        @hookimpl(tryfirst=True)
        def score(self, layer):
            seen.append(
                (
                    model.config._attn_implementation,
                    [m.self_attn.config._attn_implementation for m in model.model.layers],
                    [name for m in model.modules() for name in vars(m) if name == "forward"],
                )
            )

    pipe = pipeline(model, "fastkv", plugins=[Observer()], max_new_tokens=2, **TINY_FASTKV)
    pipe(random_rows([30])[0])
    assert seen and all(s == ("sdpa", ["sdpa"] * 4, []) for s in seen)
