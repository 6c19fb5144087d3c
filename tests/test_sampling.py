"""Sampling inside the decode step (``sampling.choose``) against transformers' own warpers and
``torch.multinomial``: the same token for the same seeded generator, the same distribution over
many draws, and the same tokens on the eager, static and compiled decode paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvpress_like import pipeline
from kvpress_like.sampling import Sampling, choose, noise, warp

from conftest import tiny_model


def _warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """What ``model.generate`` builds for these settings, in its order."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p))
    return out


def _settings(temperature: float, top_k: int, top_p: float) -> Sampling:
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    return Sampling.of(config, torch.device("cpu"))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 300),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.6]),
    top_k=st.sampled_from([0, 1, 5, 50, 1000]),
    top_p=st.sampled_from([1.0, 0.95, 0.6, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_a_draw_is_the_token_multinomial_draws_after_generates_warpers(
    rows, vocab, temperature, top_k, top_p, seed
):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    scores = _warpers(temperature, top_k, top_p)(None, logits.clone())
    expected = torch.multinomial(
        scores.softmax(dim=-1), 1, generator=torch.Generator().manual_seed(seed)
    ).squeeze(-1)
    drawn = choose(logits, noise(logits.shape, torch.Generator().manual_seed(seed), logits.device),
                   _settings(temperature, top_k, top_p))  # fmt: skip
    assert drawn.tolist() == expected.tolist()


def _chi_square_limit(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at 1 - 1e-4 (z = 3.719), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.7)]
)
def test_draws_follow_the_distribution_of_the_warped_scores(temperature, top_k, top_p):
    """Chi-square of 40,000 draws from one fixed distribution over 8 tokens against the
    probabilities transformers' warpers leave; tokens they drop are never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.5, -1.5]])
    expected = _warpers(temperature, top_k, top_p)(None, logits.clone()).softmax(dim=-1)[0]
    draws = 40_000
    many = logits.expand(draws, -1)
    tokens = choose(many, noise(many.shape, torch.Generator().manual_seed(0), many.device),
                    _settings(temperature, top_k, top_p))  # fmt: skip
    counts = torch.bincount(tokens, minlength=8).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0
    want = expected[kept].double() * draws
    statistic = float(((counts[kept] - want) ** 2 / want).sum())
    assert (
        statistic < _chi_square_limit(int(kept.sum()) - 1) if kept.sum() > 1 else counts[kept].item() == draws
    )


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_the_step_draws_the_eager_loops_tokens_on_every_decode_path(decode, fresh_dynamo):
    """Seeded sampling (temperature, top-k, top-p: drawn inside the step) gives the eager decode's
    tokens on static buffers and in the compiled step, batch 2 with different lengths."""
    model = tiny_model("llama")
    sample = dict(
        do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=7, max_new_tokens=10, stop_on_eos=False
    )
    rows = [list(range(5, 60)), list(range(70, 100))]
    pipe = pipeline(model, "snapkv", retain_rate=0.5)
    eager = pipe(rows, decode="eager", **sample).token_ids
    assert pipe(rows, decode=decode, **sample).token_ids == eager
    assert pipe(rows, decode=decode, **{**sample, "seed": 8}).token_ids != eager


@pytest.mark.parametrize("top_p", [0.95, 0.9, 0.8, 0.7, 0.6])
def test_the_top_p_cut_off_keeps_what_transformers_keeps_to_the_last_bit(top_p):
    """Two tokens, the less likely one's probability stepped across 1 - top_p one float32 ulp at a
    time: the kept tokens are exactly the warper's (a cut-off rounded differently drops some)."""
    cut = torch.tensor(1 - top_p, dtype=torch.float32)
    small = cut + torch.arange(-40, 41) * torch.finfo(torch.float32).eps * cut
    logits = torch.stack([small.log(), (1 - small).log()], dim=-1)
    expected = TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    got = warp(logits, _settings(1.0, 0, top_p))
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert torch.isfinite(expected).sum() < 2 * len(small)  # the scan crosses the cut-off


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_k=40, top_p=0.9), dict(top_k=0, top_p=0.5)])
def test_the_draw_in_the_step_is_the_processor_paths_draw(settings):
    """A no-op logits processor sends sampling between steps (transformers' warpers, then
    torch.multinomial); without it the step draws: the same seed gives the same tokens."""
    from transformers.generation.logits_process import LogitsProcessor

    class NoOp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    pipe = pipeline(tiny_model("llama"), "snapkv", retain_rate=0.5, max_new_tokens=10, stop_on_eos=False)
    rows = [list(range(5, 60)), list(range(70, 100))]
    sample = dict(do_sample=True, seed=5, **settings)
    in_step = pipe(rows, **sample).token_ids
    assert pipe(rows, logits_processor=[NoOp()], **sample).token_ids == in_step
