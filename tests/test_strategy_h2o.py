"""H2O: heavy hitters by accumulated attention plus recent tokens, checked against a plain reference.

The reference below is written from the paper's definition (every prompt query attends causally
to the keys before it, fp32 softmax; a key's score is the attention it receives, summed over all
queries and over the query heads sharing its KV head; each KV head keeps the recent window plus
the heaviest hitters up to the budget, ties to the earlier index) with plain loops, and uses
nothing from ``kvpress_like.selection``. Masks are compared exactly, scores with a float tolerance.

Exactness: inputs come from small pools of vectors with entries in {-1, 0, 1} * scale, so dot
products are exact and exact ties are common; a draw whose library and reference scores rank a
pair of valid entries differently (a float near-tie: the scores are asserted close first) is
skipped with ``assume``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import ConfigError, pipeline
from kvpress_like.hookspecs import LayerView
from kvpress_like.passkey import passkey_prompt
from kvpress_like.plugins import ModelInfo
from kvpress_like.strategies.h2o import H2O, H2OConfig

from conftest import tiny_model

NAME = "h2o"

# ---------------------------------------------------------------- reference (paper definition)


def ref_scores(view: LayerView) -> torch.Tensor:
    """Attention each key receives from every valid prompt query: [B, Hkv, S], one query at a time."""
    q, k = view.queries.double(), view.keys.double()
    batch, hq, seq, _ = q.shape
    hkv = k.shape[1]
    out = torch.zeros(batch, hkv, seq, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)  # query heads 0..G-1 share KV head 0, and so on
            for i in range(seq):
                if not view.valid[b, i]:
                    continue  # padding queries attend nowhere
                seen = (view.valid[b] & (view.positions[b] <= view.positions[b, i])).nonzero().flatten()
                logits = k[b, kv, seen] @ q[b, h, i] * view.scaling  # only the keys query i may see
                out[b, kv, seen] += torch.softmax(logits, dim=0)
    return out.float()


def ref_scores_unchunked(view: LayerView) -> torch.Tensor:
    """The same score from the whole [B, Hq, S, S] attention matrix at once (fp32)."""
    q, k = view.queries.float(), view.keys.float()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) * view.scaling  # [B, Hq, S, S]
    causal = view.positions[:, None, :] <= view.positions[:, :, None]  # [B, query, key]
    allowed = causal & view.valid[:, None, :] & view.valid[:, :, None]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    per_head = probs.sum(dim=-2)  # [B, Hq, S]
    return per_head.reshape(q.shape[0], k.shape[1] // groups, groups, -1).sum(dim=2)


def ref_budget(n: int, rate: float | None, tokens: int | None) -> int:
    return min(n, tokens) if tokens is not None else min(n, math.floor(rate * n + 0.5))


def ref_retain(scores: torch.Tensor, view: LayerView, window: int, budget_of) -> torch.Tensor:
    """Per row and KV head: the last min(window, n) valid entries, then the heaviest other ones."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        idx = [j for j in range(scores.shape[-1]) if view.valid[b, j]]
        n = len(idx)
        budget = budget_of(int(view.prompt_lengths[b]))
        for h in range(scores.shape[1]):
            recent = idx[n - min(window, n) :]
            row = scores[b, h].tolist()
            rest = sorted((j for j in idx if j not in recent), key=lambda j: (-row[j], j))
            for j in recent + rest[: budget - len(recent)]:
                out[b, h, j] = True
    return out


# ---------------------------------------------------------------- helpers


def make_view(queries, keys, lengths) -> LayerView:
    """Left-padded prefill view: row b has its lengths[b] tokens at the right, positions 0..n-1."""
    batch, _, seq, dim = keys.shape
    valid = torch.zeros(batch, seq, dtype=torch.bool)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        valid[b, seq - n :] = True
        positions[b, seq - n :] = torch.arange(n)
    return LayerView(0, 1, queries, keys, torch.randn_like(keys), positions, valid,
                     torch.tensor(lengths), dim**-0.5, None)  # fmt: skip


def make_strategy(hq: int, hkv: int, **cfg) -> H2O:
    return H2O(H2OConfig(**cfg), ModelInfo(1, hq, hkv, ("full_attention",)))


def pooled_grid(gen: torch.Generator, shape: tuple, dim: int, scale: float) -> torch.Tensor:
    """Vectors drawn from a pool of at most 4 with entries in {-1, 0, 1} * scale: many exact ties."""
    pool = torch.randint(-1, 2, (int(torch.randint(1, 5, (1,), generator=gen)), dim), generator=gen)
    return pool[torch.randint(0, pool.shape[0], shape, generator=gen)].float() * scale


def same_ranking(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> bool:
    """True if a and b order every pair of valid entries of each row the same way (>, ==, <)."""
    sa = torch.sign(a[..., :, None] - a[..., None, :])
    sb = torch.sign(b[..., :, None] - b[..., None, :])
    pairs = (valid[..., :, None] & valid[..., None, :]).expand_as(sa)
    return bool(torch.equal(sa[pairs], sb[pairs]))


# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq = draw(st.integers(1, 28))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)] if draw(st.booleans()) else [seq] * batch
    cfg = {"chunk_size": draw(st.integers(1, seq + 3))}
    if draw(st.booleans()):
        cfg.update(budget_mode="constant", window=draw(st.integers(1, 10)))
        cfg["retain_tokens"] = draw(st.integers(cfg["window"], 32))
    else:
        cfg["retain_rate"] = draw(st.floats(0.05, 1.0))
        tight = [ref_budget(n, cfg["retain_rate"], None) for n in lengths]
        max_window = min([10, *(k for k, n in zip(tight, lengths, strict=True) if k < n)])
        assume(max_window >= 1)  # the window must fit in every budget that does not keep the row
        cfg["window"] = draw(st.integers(1, max_window))
    shape = dict(batch=batch, seq=seq, hkv=draw(st.integers(1, 3)), groups=draw(st.integers(1, 3)),
                 dim=draw(st.sampled_from([4, 8])), scale=draw(st.sampled_from([0.5, 32.0])),
                 seed=draw(st.integers(0, 2**31 - 1)))  # fmt: skip
    return lengths, cfg, shape


@settings(max_examples=100, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """Scores (any chunk size) match the reference closely, retain masks exactly."""
    lengths, cfg, s = case
    gen = torch.Generator().manual_seed(s["seed"])
    hq = s["hkv"] * s["groups"]
    queries = pooled_grid(gen, (s["batch"], hq, s["seq"]), s["dim"], s["scale"])
    keys = pooled_grid(gen, (s["batch"], s["hkv"], s["seq"]), s["dim"], s["scale"])
    view = make_view(queries, keys, lengths)
    strategy = make_strategy(hq, s["hkv"], **cfg)
    strategy.check_prompt(lengths)

    scores = strategy.score(layer=view)
    expected = ref_scores(view)
    assert scores.dtype == torch.float32 and scores.shape == (s["batch"], s["hkv"], s["seq"])
    valid = view.valid[:, None].expand_as(scores)
    torch.testing.assert_close(scores[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assume(same_ranking(scores, expected, valid))

    def budget_of(n):
        return ref_budget(n, cfg.get("retain_rate"), cfg.get("retain_tokens"))

    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_retain(expected, view, cfg["window"], budget_of))
    assert keep.sum(-1).tolist() == [[budget_of(n)] * s["hkv"] for n in lengths]


@pytest.mark.parametrize("lengths", [[23], [23, 17, 5]], ids=["full-row", "left-padded"])
def test_chunked_score_equals_unchunked(lengths):
    """chunk_size 1, a few that do not divide S, S itself and more than S: all the same scores."""
    gen = torch.Generator().manual_seed(7)
    queries = torch.randn(len(lengths), 6, 23, 8, generator=gen) * 2
    keys = torch.randn(len(lengths), 2, 23, 8, generator=gen) * 2
    view = make_view(queries, keys, lengths)
    expected = ref_scores_unchunked(view)
    torch.testing.assert_close(expected, ref_scores(view), rtol=1e-5, atol=1e-5)  # the two references agree
    for chunk in (1, 2, 5, 7, 22, 23, 24, 512):
        scores = make_strategy(6, 2, chunk_size=chunk).score(layer=view)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5, msg=f"chunk_size={chunk}")


@pytest.mark.parametrize("chunk", [1, 4, 10, 64])
def test_no_full_attention_matrix_is_built(monkeypatch, chunk):
    """Every softmax the score takes covers at most chunk_size queries: [B, Hkv, G, <=chunk, S]."""
    shapes = []
    softmax = torch.softmax

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return softmax(x, *args, **kwargs)

    gen = torch.Generator().manual_seed(1)
    view = make_view(
        torch.randn(2, 4, 30, 8, generator=gen), torch.randn(2, 2, 30, 8, generator=gen), [30, 21]
    )
    strategy = make_strategy(4, 2, chunk_size=chunk)
    monkeypatch.setattr(torch, "softmax", spy)
    scores = strategy.score(layer=view)
    monkeypatch.undo()
    assert len(shapes) == math.ceil(30 / chunk)
    assert all(shape[-2] <= chunk and shape[-1] == 30 for shape in shapes)
    assert sum(shape[-2] for shape in shapes) == 30  # every query once
    torch.testing.assert_close(scores, ref_scores_unchunked(view), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hand-made examples


def one_hot(seq: int, dim: int, rows: dict[int, int], scale: float = 8.0) -> torch.Tensor:
    out = torch.zeros(seq, dim)
    for i, d in rows.items():
        out[i, d] = scale
    return out


def test_a_key_many_queries_attend_to_beats_one_the_last_query_attends_to():
    """Queries 3..7 all look for e0 (key 2); only query 9 looks for e1 (key 6). H2O keeps key 2
    (five queries' worth of attention) where an observation window of 1 would keep key 6."""
    keys = one_hot(10, 4, {2: 0, 6: 1})[None, None]
    queries = one_hot(10, 4, {3: 0, 4: 0, 5: 0, 7: 0, 8: 0, 9: 1})[None, None]
    view = make_view(queries, keys, [10])
    strategy = make_strategy(1, 1, window=1, budget_mode="constant", retain_tokens=2)
    scores = strategy.score(layer=view)
    assert int(scores[0, 0, :9].argmax()) == 2
    assert strategy.retain(layer=view, scores=scores)[0, 0].nonzero().flatten().tolist() == [2, 9]


def test_padding_neither_receives_nor_gives_attention():
    """Left padding of 4: padding keys score 0, and a row's scores do not depend on its padding."""
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(1, 2, 12, 4, generator=gen), torch.randn(1, 1, 12, 4, generator=gen)
    padded = make_strategy(2, 1).score(layer=make_view(queries, keys, [8]))
    alone = make_strategy(2, 1).score(layer=make_view(queries[:, :, 4:], keys[:, :, 4:], [8]))
    assert torch.equal(padded[..., :4], torch.zeros(1, 1, 4))
    torch.testing.assert_close(padded[..., 4:], alone)
    torch.testing.assert_close(alone.sum(), torch.tensor(2 * 8.0))  # each query's attention sums to 1


def test_sliding_window_layers_are_not_scored():
    """retain is never asked at a sliding layer, so the S x S accumulation is skipped there."""
    gen = torch.Generator().manual_seed(3)
    view = make_view(torch.randn(1, 2, 16, 4, generator=gen), torch.randn(1, 1, 16, 4, generator=gen), [16])
    strategy = make_strategy(2, 1, budget_mode="constant", retain_tokens=8)
    assert strategy.score(layer=replace(view, sliding_window=12)) is None
    assert strategy.retain(layer=replace(view, sliding_window=12), scores=None) is None
    assert strategy.score(layer=view) is not None


# ---------------------------------------------------------------- end to end (tiny models)

ROWS = {
    "batch1": [torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()],
    "batch2-left-padded": [
        torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(4)).tolist(),
        torch.randint(3, 256, (27,), generator=torch.Generator().manual_seed(5)).tolist(),
    ],
}
BUDGETS = {
    "proportional": (dict(retain_rate=0.3, window=4, chunk_size=7), lambda n: math.floor(0.3 * n + 0.5)),
    "constant": (dict(budget_mode="constant", retain_tokens=11, window=5), lambda n: 11),
}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("mode", sorted(BUDGETS))
def test_budget_is_respected_end_to_end(family, rows, mode):
    model = tiny_model(family)
    cfg, budget_of = BUDGETS[mode]
    prompts = ROWS[rows]
    budgets = [budget_of(len(p)) for p in prompts]
    pipe = pipeline(model, NAME, max_new_tokens=3, stop_on_eos=False, **cfg)
    out = pipe(prompts)
    layers = model.config.num_hidden_layers
    assert out.stats.kv_kept_per_layer == [[float(k) for k in budgets]] * layers
    assert out.stats.tokens_per_layer == [[len(p) for p in prompts]] * layers  # no propagation

    context = pipe.compress(prompts)
    heads = model.config.num_key_value_heads
    for layer in context.cache.layers:
        assert layer.valid.sum(-1).tolist() == [[k] * heads for k in budgets]
        for b, n in enumerate(map(len, prompts)):
            for h in range(heads):
                kept = layer.positions[b, h][layer.valid[b, h]].tolist()
                assert kept[-cfg["window"] :] == list(range(n - cfg["window"], n))  # the window is kept


def test_mixed_sliding_and_full_layers():
    """Gemma3 (sliding, full, sliding, full): full layers keep the budget, sliding ones their window."""
    model = tiny_model("gemma3")
    prompts = ROWS["batch2-left-padded"]
    out = pipeline(model, NAME, retain_rate=0.3, window=4, max_new_tokens=2)(prompts)
    window = model.config.sliding_window
    kept = out.stats.kv_kept_per_layer
    assert kept[1] == kept[3] == [12.0, 8.0]
    assert kept[0] == kept[2] == [float(window - 1)] * 2  # positions > n - window: window - 1 of them


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_keep_everything_matches_full(family, rows):
    model = tiny_model(family)
    full = pipeline(model, "full", max_new_tokens=6, stop_on_eos=False)(ROWS[rows])
    kept = pipeline(model, NAME, retain_rate=1.0, chunk_size=5, max_new_tokens=6, stop_on_eos=False)
    kept = kept(ROWS[rows])
    assert kept.token_ids == full.token_ids
    assert kept.stats.kv_kept_per_layer == full.stats.kv_kept_per_layer


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_short_passkey_run(smollm2):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 300, 0.5, seed=0)
    pipe = pipeline(model, NAME, tokenizer=tokenizer, chat_template=False, max_new_tokens=5, chunk_size=128)
    out = pipe(prompt.text)
    n = out.stats.prompt_tokens[0]
    assert 250 <= n <= 350
    budget = math.floor(0.1 * n + 0.5)  # default retain_rate
    assert out.stats.kv_kept_per_layer == [[float(budget)]] * model.config.num_hidden_layers
    assert 1 <= len(out.ids) <= 5


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"chunk_size": 0}, ["h2o.chunk_size", "greater than or equal to 1", "(got 0)"]),
        ({"chunk_size": 2.5}, ["h2o.chunk_size", "(got 2.5)"]),
        ({"retain_rate": 0.0}, ["h2o.retain_rate", "greater than 0", "(got 0.0)"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"pooling": "max"}, ["h2o.pooling", "Extra inputs are not permitted"]),
    ],
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    with pytest.raises(ConfigError) as err:
        pipeline(tiny_model("llama"), NAME, **settings)
    for fragment in expected:
        assert fragment in str(err.value)


def test_window_larger_than_budget_fails_before_prefill():
    pipe = pipeline(tiny_model("llama"), NAME, retain_rate=0.1, window=8)  # 4 of 40 < 8
    with pytest.raises(ConfigError) as err:
        pipe(ROWS["batch1"])
    assert "h2o.window" in str(err.value) and "keeps 4 tokens" in str(err.value)
