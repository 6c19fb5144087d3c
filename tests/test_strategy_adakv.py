"""Ada-KV checked against an independent plain-PyTorch reference written from the paper.

The reference selection, per row (``n`` prompt tokens, uniform budget ``k``, ``w = min(window, n)``,
``H`` KV heads, ``f = floor(floor * (k - w))``): every head keeps its ``w`` most recent tokens, then
its own ``f`` best other entries (the safeguard), then the best ``H * (k - w - f)`` of all the
entries still left, compared across heads jointly; ties go to the earlier position within a head
and to the lower head, then the earlier position, across heads. It uses nothing from
``kvpress_like.selection`` or ``kvpress_like.budget``.

Exactness: hook-level inputs come from tiny value sets (scores in {0, 1, 2}; queries and keys from a
pool of at most 4 vectors with entries in {-1, 0, 1} * scale), so exact ties, within and across
heads, are common. Float near-ties between the two score computations are skipped with ``assume``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like import ConfigError, pipeline
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.plugins import ModelInfo
from kvpress_like.strategies.adakv import AdaKV, AdaKVConfig

from conftest import tiny_model

# ---------------------------------------------------------------- reference (paper definition)


def ref_uniform(n: int, rate: float | None, tokens: int | None) -> int:
    """The uniform per-head budget: ``tokens`` (constant) or ``rate * n`` rounded half up."""
    return min(n, tokens) if tokens is not None else min(n, math.floor(rate * n + 0.5))


def ref_guaranteed(n: int, uniform: int, window: int, floor: float) -> int:
    """Entries every head keeps whatever the other heads' scores: its window plus the safeguard."""
    w = min(window, n)
    return w + math.floor(floor * (uniform - w))


def ref_keep(
    scores: torch.Tensor, valid: torch.Tensor, window: int, row_budgets: list[int], floor: float
) -> torch.Tensor:
    """Window, safeguard, then one top-k over all heads. ``scores`` [B, H, S], ``valid`` [B, S]."""
    batch, heads, seq = scores.shape
    out = torch.zeros(batch, heads, seq, dtype=torch.bool)
    for b in range(batch):
        entries = [j for j in range(seq) if valid[b, j]]
        n, k = len(entries), row_budgets[b]
        w = min(window, n)
        safeguard = ref_guaranteed(n, k, window, floor) - w
        recent = entries[n - w :]
        for h in range(heads):
            rest = sorted((j for j in entries if j not in recent), key=lambda j: (-float(scores[b, h, j]), j))
            for j in recent + rest[:safeguard]:
                out[b, h, j] = True
        left = [(h, j) for h in range(heads) for j in entries if not out[b, h, j]]
        left.sort(key=lambda hj: (-float(scores[b, hj[0], hj[1]]), hj[0], hj[1]))
        for h, j in left[: heads * (k - w - safeguard)]:
            out[b, h, j] = True
    return out


def ref_scores(view: LayerView, window: int, pooling: str, kernel: int) -> torch.Tensor:
    """Observation-window scores [B, Hkv, S]: the last ``window`` queries' softmax (causal by
    position, padding masked) summed, pooled over keys, summed over each KV group's query heads."""
    q, k = view.queries.float(), view.keys.float()
    batch, hq, seq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, k.shape[1], seq)
    for b in range(batch):
        for h in range(hq):
            summed = torch.zeros(seq)
            for i in range(seq - min(window, seq), seq):
                if view.valid[b, i]:
                    allowed = view.valid[b] & (view.positions[b] <= view.positions[b, i])
                    logits = (k[b, h // group] @ q[b, h, i]) * view.scaling
                    summed[allowed] += torch.softmax(logits[allowed], dim=0)
            for j in range(seq):
                nbrs = summed[max(0, j - kernel // 2) : j + kernel // 2 + 1]
                out[b, h // group, j] += nbrs.max() if pooling == "max" else nbrs.sum() / kernel
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
    return LayerView(0, 1, queries, keys, torch.randn_like(keys), positions, valid, torch.tensor(lengths),
                     dim**-0.5, None)  # fmt: skip


def make_adakv(hq: int, hkv: int, **cfg) -> AdaKV:
    return AdaKV(AdaKVConfig(**cfg), ModelInfo(1, hq, hkv, ("full_attention",)))


def pooled_grid(gen: torch.Generator, shape: tuple, dim: int, scale: float) -> torch.Tensor:
    """Vectors drawn from a pool of at most 4 with entries in {-1, 0, 1} * scale: many exact ties."""
    pool = torch.randint(-1, 2, (int(torch.randint(1, 5, (1,), generator=gen)), dim), generator=gen)
    return pool[torch.randint(0, pool.shape[0], shape, generator=gen)].float() * scale


def same_ranking(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> bool:
    """True if a and b order every pair of valid entries of each row the same way (>, ==, <)."""
    sign = lambda x: torch.sign(x[..., :, None] - x[..., None, :])  # noqa: E731
    pair_valid = (valid[..., :, None] & valid[..., None, :]).expand_as(sign(a))
    return bool(torch.equal(sign(a)[pair_valid], sign(b)[pair_valid]))


def uniform_of(cfg: dict):
    return lambda n: ref_uniform(n, cfg.get("retain_rate"), cfg.get("retain_tokens"))


# ---------------------------------------------------------------- property tests


@st.composite
def cases(draw):
    seq = draw(st.integers(1, 40))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)] if draw(st.booleans()) else [seq] * batch
    cfg: dict = {"floor": draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]) | st.floats(0.0, 1.0))}
    if draw(st.booleans()):
        window = draw(st.integers(1, 10))
        cfg.update(budget_mode="constant", window=window, retain_tokens=draw(st.integers(window, 45)))
    else:
        cfg["retain_rate"] = draw(st.floats(0.05, 1.0))
        tight = [ref_uniform(n, cfg["retain_rate"], None) for n in lengths]
        tight = [k for k, n in zip(tight, lengths, strict=True) if k < n]
        assume(min([10, *tight]) >= 1)
        cfg["window"] = draw(st.integers(1, min([10, *tight])))
    cfg.update(pooling=draw(st.sampled_from(["max", "avg"])), kernel=draw(st.sampled_from([1, 3, 5])))
    shape = {"batch": batch, "seq": seq, "hkv": draw(st.integers(1, 4)), "groups": draw(st.integers(1, 3)),
             "dim": draw(st.sampled_from([4, 8])), "scale": draw(st.sampled_from([0.5, 32.0])),
             "seed": draw(st.integers(0, 2**31 - 1))}  # fmt: skip
    return lengths, cfg, shape


def build(lengths, cfg, s):
    gen = torch.Generator().manual_seed(s["seed"])
    hq = s["hkv"] * s["groups"]
    queries = pooled_grid(gen, (s["batch"], hq, s["seq"]), s["dim"], s["scale"])
    keys = pooled_grid(gen, (s["batch"], s["hkv"], s["seq"]), s["dim"], s["scale"])
    strategy = make_adakv(hq, s["hkv"], **cfg)
    strategy.check_prompt(lengths)  # the settings are valid for these prompts
    return gen, make_view(queries, keys, lengths), strategy, [uniform_of(cfg)(n) for n in lengths]


def assert_budgets(counts: torch.Tensor, lengths: list[int], cfg: dict) -> None:
    """Per-head counts ``[B, H]``: each head keeps its guaranteed entries (and at most the prompt),
    the heads of a row keep H x the uniform budget together."""
    heads = counts.shape[1]
    for row, n in zip(counts.tolist(), lengths, strict=True):
        k = uniform_of(cfg)(n)
        assert sum(row) == heads * k
        assert all(ref_guaranteed(n, k, cfg["window"], cfg["floor"]) <= c <= n for c in row)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_retain_matches_reference_on_tied_scores(case):
    """Scores from {0, 1, 2} (many exact ties within and across heads): masks equal exactly."""
    lengths, cfg, s = case
    gen, view, strategy, row_budgets = build(lengths, cfg, s)
    scores = torch.randint(0, 3, (s["batch"], s["hkv"], s["seq"]), generator=gen).float()
    keep = strategy.retain(layer=view, scores=scores)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep, ref_keep(scores, view.valid, cfg["window"], row_budgets, cfg["floor"]))
    assert_budgets(keep.sum(-1), lengths, cfg)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_score_and_retain_match_reference(case):
    """The hooks chained as the pipeline does: scores close to the reference, masks exact. The
    joint top-k compares heads, so the two score tensors must rank every pair of a row alike."""
    lengths, cfg, s = case
    _, view, strategy, row_budgets = build(lengths, cfg, s)
    scores = strategy.score(layer=view)
    expected = ref_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    flat_valid = view.valid[:, None].expand_as(scores).reshape(s["batch"], -1)
    assume(same_ranking(scores.reshape(s["batch"], -1), expected.reshape(s["batch"], -1), flat_valid))
    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_keep(expected, view.valid, cfg["window"], row_budgets, cfg["floor"]))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_floor_one_is_the_uniform_per_head_budget(case):
    """floor = 1: the safeguard is the whole budget, every head keeps exactly k (SnapKV-like)."""
    lengths, cfg, s = case
    gen, view, strategy, row_budgets = build(lengths, {**cfg, "floor": 1.0}, s)
    scores = torch.randint(0, 3, (s["batch"], s["hkv"], s["seq"]), generator=gen).float()
    keep = strategy.retain(layer=view, scores=scores)
    assert keep.sum(-1).tolist() == [[k] * s["hkv"] for k in row_budgets]


# ---------------------------------------------------------------- hand-made examples


def hand_view(scores: torch.Tensor) -> LayerView:
    """A one-row view for hand-made scores ``[1, H, S]`` (the retain hook reads only the masks)."""
    _, heads, seq = scores.shape
    return make_view(torch.zeros(1, heads, seq, 4), torch.zeros(1, heads, seq, 4), [seq])


CONCENTRATED_VS_SPREAD = torch.tensor([[[9.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [5.0, 5, 5, 5, 5, 0, 0, 0, 0, 0]]])


@pytest.mark.parametrize(
    ("floor", "head0", "head1"),
    [
        # f = 0: 6 joint picks: head 0's 9, head 1's five 5s.
        (0.0, [0, 9], [0, 1, 2, 3, 4, 9]),
        # f = floor(0.5 * 3) = 1 each (the 9 and the first 5), then 4 joint picks: head 1's other 5s.
        (0.5, [0, 9], [0, 1, 2, 3, 4, 9]),
        # f = floor(0.7 * 3) = 2 each: head 0 adds its first 0 (earlier position), head 1 two 5s;
        # the 2 joint picks are head 1's next 5s (the last 5 loses to the lower budget).
        (0.7, [0, 1, 9], [0, 1, 2, 3, 9]),
        # f = 3: uniform, 3 best + the window per head (head 0's ties go to earlier positions).
        (1.0, [0, 1, 2, 9], [0, 1, 2, 9]),
    ],
)
def test_a_concentrated_head_gives_its_share_to_a_spread_one(floor, head0, head1):
    """Two heads, budget 4 each (window 1): the layer keeps 8 entries, split by the scores."""
    adakv = make_adakv(2, 2, floor=floor, window=1, budget_mode="constant", retain_tokens=4)
    scores = CONCENTRATED_VS_SPREAD
    keep = adakv.retain(layer=hand_view(scores), scores=scores)
    assert keep[0, 0].nonzero().flatten().tolist() == head0
    assert keep[0, 1].nonzero().flatten().tolist() == head1


def test_ties_across_heads_go_to_the_lower_head():
    scores = torch.ones(1, 2, 10)
    adakv = make_adakv(2, 2, floor=0.0, window=1, budget_mode="constant", retain_tokens=4)
    keep = adakv.retain(layer=hand_view(scores), scores=scores)
    assert keep[0].sum(-1).tolist() == [7, 1]  # 6 joint picks, all from head 0
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 9]


def test_hooks_read_nothing_back_to_the_host():
    """Meta tensors hold no data, so any host sync (item, int, bool, nonzero) would raise."""
    batch, hkv, hq, seq, dim = 2, 3, 6, 32, 8
    meta = dict(device="meta")
    strategy = make_adakv(hq, hkv, window=4, retain_rate=0.2)
    for layer_idx in range(6):
        view = LayerView(layer_idx, 6, torch.empty(batch, hq, seq, dim, **meta),
                         torch.empty(batch, hkv, seq, dim, **meta), torch.empty(batch, hkv, seq, dim, **meta),
                         torch.empty(batch, seq, dtype=torch.long, **meta),
                         torch.empty(batch, seq, dtype=torch.bool, **meta),
                         torch.empty(batch, dtype=torch.long, **meta), dim**-0.5, None)  # fmt: skip
        keep = strategy.retain(layer=view, scores=strategy.score(layer=view))
        assert keep.shape == (batch, hkv, seq) and keep.dtype == torch.bool


# ---------------------------------------------------------------- end to end

CONTEXT = torch.randint(3, 256, (50,), generator=torch.Generator().manual_seed(3)).tolist()
SETTINGS = {"retain_rate": 0.2, "window": 4, "floor": 0.2}


class ScoreRecorder:
    """Answers ``score`` on top of the strategy with the same scores, and records what it saw."""

    def __init__(self, **cfg) -> None:
        self.scorer = make_adakv(1, 1, **cfg)
        self.seen: dict[int, tuple[LayerView, torch.Tensor]] = {}

    @hookimpl
    def score(self, layer: LayerView) -> torch.Tensor:
        scores = self.scorer.score(layer=layer)
        self.seen[layer.layer_idx] = (layer, scores)
        return scores


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", [[CONTEXT], [CONTEXT, CONTEXT[13:]]], ids=["batch1", "batch2-left-padded"])
def test_pipeline_keeps_the_budgets_and_the_reference_choice(family, rows):
    model = tiny_model(family)
    lengths = [len(r) for r in rows]
    kv_heads = model.config.num_key_value_heads
    out = pipeline(model, "adakv", max_new_tokens=3, **SETTINGS)(rows)
    assert out.stats.kv_kept_per_layer == [[float(ref_uniform(n, 0.2, None)) for n in lengths]] * len(
        model.model.layers
    )
    recorder = ScoreRecorder(**SETTINGS)
    cache = pipeline(model, "adakv", plugins=[recorder], **SETTINGS).compress(rows).cache
    uneven = 0
    for i, layer in enumerate(cache.layers):
        counts = layer.valid.sum(-1)  # [B, Hkv]
        assert counts.shape == (len(rows), kv_heads)
        assert_budgets(counts, lengths, SETTINGS)
        uneven += int((counts != counts[:, :1]).any())
        # Each head holds exactly the positions the reference picks from that layer's scores.
        view, scores = recorder.seen[i]
        budgets = [ref_uniform(n, 0.2, None) for n in lengths]
        expected = ref_keep(scores, view.valid, SETTINGS["window"], budgets, SETTINGS["floor"])
        positions, valid = layer.positions, layer.valid
        for b in range(len(rows)):
            for h in range(kv_heads):
                kept = sorted(positions[b, h][valid[b, h]].tolist())
                assert kept == view.positions[b][expected[b, h]].tolist()
    assert uneven > 0, "the heads should not all keep the same number of entries"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", [[CONTEXT], [CONTEXT, CONTEXT[13:]]], ids=["batch1", "batch2-left-padded"])
def test_keep_everything_reproduces_the_full_cache(family, rows):
    model = tiny_model(family)
    gen = dict(max_new_tokens=8, stop_on_eos=False)
    expected = pipeline(model, "full", **gen)(rows).token_ids
    assert len({t for row in expected for t in row}) > 2, "degenerate reference"
    out = pipeline(model, "adakv", retain_rate=1.0, window=4, **gen)(rows)
    assert out.token_ids == expected
    assert out.stats.kv_kept_per_layer == [[float(len(r)) for r in rows]] * model.config.num_hidden_layers


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"floor": 1.5}, ["adakv.floor", "less than or equal to 1", "1.5"]),
        ({"floor": -0.1}, ["adakv.floor", "greater than or equal to 0", "-0.1"]),
        ({"retain_rate": 1.2}, ["adakv.retain_rate", "less than or equal to 1", "1.2"]),
        ({"budget_mode": "constant", "retain_tokens": 4}, ["retain_tokens must be >= window (8)", "4"]),
        ({"flor": 0.2}, ["adakv.flor", "Extra inputs are not permitted"]),
    ],
)
def test_bad_settings_name_field_rule_and_value(settings, expected):
    with pytest.raises(ConfigError) as err:
        pipeline(tiny_model("llama"), "adakv", **settings)
    for fragment in expected:
        assert fragment in str(err.value)


def test_window_larger_than_budget_fails_before_prefill():
    pipe = pipeline(tiny_model("llama"), "adakv", window=8, retain_rate=0.1)
    with pytest.raises(ConfigError, match=r"adakv\.window.*keeps 4 tokens.*window=8"):
        pipe(list(range(3, 43)))


@pytest.mark.slow
def test_smollm2_short_prompt_keeps_the_budgets(smollm2):
    from kvpress_like.passkey import passkey_prompt

    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 300, 0.5, seed=0)
    pipe = pipeline(model, "adakv", tokenizer=tokenizer, chat_template=False, max_new_tokens=5)
    out = pipe(prompt.text)
    n = out.stats.prompt_tokens[0]
    k = ref_uniform(n, 0.1, None)
    assert out.stats.kv_kept_per_layer == [[float(k)]] * model.config.num_hidden_layers
    assert 1 <= len(out.ids) <= 5
    cache = pipe.compress(prompt.text).cache
    defaults = {"retain_rate": 0.1, "window": 8, "floor": 0.2}
    for layer in cache.layers:
        assert_budgets(layer.valid.sum(-1), [n], defaults)
