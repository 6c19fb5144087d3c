"""SnapKV: observation-window selection per KV head, checked against a plain reference.

The reference below is written from the paper's definition (the last ``window`` prompt queries
vote for keys: fp32 softmax, summed over the window, pooled over keys with stride 1 and zero
padding, summed over the query heads sharing a KV head; each KV head keeps its window plus the
best-voted keys up to the budget, ties to the earlier index) with plain loops, and uses nothing
from ``kvpress_like.selection``. Masks are compared exactly, scores with a float tolerance.

Exactness: inputs come from small pools of vectors with entries in {-1, 0, 1} * scale, so dot
products are exact and exact ties are common; a draw whose library and reference scores rank a
pair of valid entries differently (a float near-tie: the scores are asserted close first) is
skipped with ``assume``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import ConfigError, pipeline
from kvpress_like.hookspecs import LayerView
from kvpress_like.passkey import passkey_prompt
from kvpress_like.plugins import ModelInfo
from kvpress_like.strategies.snapkv import SnapKV, SnapKVConfig

from conftest import tiny_model

NAME = "snapkv"

# ---------------------------------------------------------------- reference (paper definition)


def ref_scores(view: LayerView, window: int, pooling: str, kernel: int) -> torch.Tensor:
    """Votes of the observation window for every key: [B, Hkv, S]."""
    q, k = view.queries.double(), view.keys.double()
    batch, hq, seq, _ = q.shape
    hkv = k.shape[1]
    out = torch.zeros(batch, hkv, seq, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)  # query heads 0..G-1 share KV head 0, and so on
            votes = [0.0] * seq
            for i in range(max(0, seq - window), seq):
                if not view.valid[b, i]:
                    continue
                seen = (view.valid[b] & (view.positions[b] <= view.positions[b, i])).nonzero().flatten()
                logits = k[b, kv, seen] @ q[b, h, i] * view.scaling  # only the keys query i may see
                for j, p in zip(seen.tolist(), torch.softmax(logits, dim=0).tolist(), strict=True):
                    votes[j] += p
            for j in range(seq):
                lo, hi = j - kernel // 2, j + kernel // 2
                near = [votes[x] for x in range(lo, hi + 1) if 0 <= x < seq]
                pooled = max(near) if pooling == "max" else sum(near) / kernel  # avg: padding counts as 0
                out[b, kv, j] += pooled
    return out.float()


def ref_budget(n: int, rate: float | None, tokens: int | None) -> int:
    return min(n, tokens) if tokens is not None else min(n, math.floor(rate * n + 0.5))


def ref_retain(scores: torch.Tensor, view: LayerView, window: int, budget_of) -> torch.Tensor:
    """Per row and KV head: the last min(window, n) valid entries, then the best other valid ones."""
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


def make_strategy(hq: int, hkv: int, **cfg) -> SnapKV:
    return SnapKV(SnapKVConfig(**cfg), ModelInfo(1, hq, hkv, ("full_attention",)))


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
    seq = draw(st.integers(1, 32))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)] if draw(st.booleans()) else [seq] * batch
    cfg = {"pooling": draw(st.sampled_from(["max", "avg"])), "kernel": draw(st.sampled_from([1, 3, 5, 7]))}
    if draw(st.booleans()):
        cfg.update(budget_mode="constant", window=draw(st.integers(1, 10)))
        cfg["retain_tokens"] = draw(st.integers(cfg["window"], 36))
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


@settings(max_examples=150, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """Scores match the reference closely, retain masks exactly; one choice per KV head."""
    lengths, cfg, s = case
    gen = torch.Generator().manual_seed(s["seed"])
    hq = s["hkv"] * s["groups"]
    queries = pooled_grid(gen, (s["batch"], hq, s["seq"]), s["dim"], s["scale"])
    keys = pooled_grid(gen, (s["batch"], s["hkv"], s["seq"]), s["dim"], s["scale"])
    view = make_view(queries, keys, lengths)
    strategy = make_strategy(hq, s["hkv"], **cfg)
    strategy.check_prompt(lengths)

    scores = strategy.score(layer=view)
    expected = ref_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"])
    assert scores.shape == (s["batch"], s["hkv"], s["seq"])
    valid = view.valid[:, None].expand_as(scores)
    torch.testing.assert_close(scores[valid], expected[valid], rtol=1e-5, atol=1e-6)
    assume(same_ranking(scores, expected, valid))

    def budget_of(n):
        return ref_budget(n, cfg.get("retain_rate"), cfg.get("retain_tokens"))

    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_retain(expected, view, cfg["window"], budget_of))
    assert keep.sum(-1).tolist() == [[budget_of(n)] * s["hkv"] for n in lengths]


# ---------------------------------------------------------------- hand-made examples


def one_hot(seq: int, dim: int, rows: dict[int, int], scale: float = 8.0) -> torch.Tensor:
    out = torch.zeros(seq, dim)
    for i, d in rows.items():
        out[i, d] = scale
    return out


def test_each_kv_head_keeps_what_its_own_query_group_looks_at():
    """Hq=4, Hkv=2: heads 0,1 read KV head 0, heads 2,3 KV head 1. Both KV heads hold e0 at key 1
    and e1 at key 3; head 1 looks for e0 and head 2 for e1, so KV head 0 keeps key 1 and KV head 1
    keeps key 3 (pairing by h % Hkv would swap them); the last token is the window."""
    keys = one_hot(6, 4, {1: 0, 3: 1})[None, None].repeat(1, 2, 1, 1)
    queries = torch.zeros(1, 4, 6, 4)
    queries[0, 1, 5, 0] = queries[0, 2, 5, 1] = 8.0
    view = make_view(queries, keys, [6])
    strategy = make_strategy(4, 2, window=1, kernel=1, budget_mode="constant", retain_tokens=2)
    keep = strategy.retain(layer=view, scores=strategy.score(layer=view))
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 5]
    assert keep[0, 1].nonzero().flatten().tolist() == [3, 5]


def test_avg_pooling_keeps_the_neighbourhood_of_a_peak():
    """Default avg pooling (kernel 5): one sharp peak at key 10 spreads to keys 8..12; among
    equal pooled votes the earlier key wins. Budget 4 = window 1 + keys 8, 9, 10."""
    keys = one_hot(20, 4, {10: 0})[None, None]
    queries = one_hot(20, 4, {19: 0}, scale=32.0)[None, None]
    view = make_view(queries, keys, [20])
    strategy = make_strategy(1, 1, window=1, budget_mode="constant", retain_tokens=4)
    assert strategy.config.pooling == "avg" and strategy.config.kernel == 5
    keep = strategy.retain(layer=view, scores=strategy.score(layer=view))[0, 0]
    assert keep.nonzero().flatten().tolist() == [8, 9, 10, 19]


# ---------------------------------------------------------------- end to end (tiny models)

ROWS = {
    "batch1": [torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()],
    "batch2-left-padded": [
        torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(4)).tolist(),
        torch.randint(3, 256, (27,), generator=torch.Generator().manual_seed(5)).tolist(),
    ],
}
BUDGETS = {
    "proportional": (dict(retain_rate=0.3, window=4), lambda n: math.floor(0.3 * n + 0.5)),
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
    choices = set()
    for layer in context.cache.layers:
        assert layer.valid.sum(-1).tolist() == [[k] * heads for k in budgets]
        for b, n in enumerate(map(len, prompts)):
            for h in range(heads):
                kept = layer.positions[b, h][layer.valid[b, h]].tolist()
                assert kept[-cfg["window"] :] == list(range(n - cfg["window"], n))  # the window is kept
                choices.add(tuple(kept))
    assert len(choices) > len(prompts), "heads and layers should choose differently"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_keep_everything_matches_full(family, rows):
    model = tiny_model(family)
    full = pipeline(model, "full", max_new_tokens=6, stop_on_eos=False)(ROWS[rows])
    kept = pipeline(model, NAME, retain_rate=1.0, max_new_tokens=6, stop_on_eos=False)(ROWS[rows])
    assert kept.token_ids == full.token_ids
    assert kept.stats.kv_kept_per_layer == full.stats.kv_kept_per_layer


# ---------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_short_passkey_run(smollm2):
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 300, 0.5, seed=0)
    pipe = pipeline(model, NAME, tokenizer=tokenizer, chat_template=False, max_new_tokens=5)
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
        ({"kernel": 4}, ["kernel: must be odd", "(got 4)"]),
        ({"kernel": 0}, ["snapkv.kernel", "greater than or equal to 1", "(got 0)"]),
        ({"pooling": "median"}, ["snapkv.pooling", "'max' or 'avg'", "median"]),
        ({"retain_rate": 1.5}, ["snapkv.retain_rate", "less than or equal to 1", "(got 1.5)"]),
        ({"window": 0}, ["snapkv.window", "greater than or equal to 1", "(got 0)"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"tsp_rate": 0.2}, ["snapkv.tsp_rate", "Extra inputs are not permitted"]),
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
    assert "snapkv.window" in str(err.value) and "keeps 4 tokens" in str(err.value)
    assert "window=8" in str(err.value)
