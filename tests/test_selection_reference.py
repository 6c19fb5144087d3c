"""FastKV's token selection checked against an independent plain-PyTorch reference.

The reference below is written from the paper's definition (observation-window softmax scores,
pooling over keys, GQA group sums, "last window always kept" + top-k with ties to the earlier index)
and uses nothing from ``kvpress_like.selection``. Masks are compared exactly, scores with a float
tolerance.

Exactness: inputs are built from small pools of vectors with entries in {-1, 0, 1} * scale, so
dot products are exact and exact ties (repeated keys, max-pooling plateaus, zero-probability keys)
are common. Summation order still differs between reference and library, so a draw whose two score
tensors *rank* some pair of valid entries differently (a float near-tie, not a real difference:
the scores are asserted close first) is skipped with ``assume``.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvpress_like.hookspecs import LayerView
from kvpress_like.plugins import ModelInfo
from kvpress_like.strategies.fastkv import FastKV, FastKVConfig

# ---------------------------------------------------------------- reference (paper definition)


def ref_scores(view: LayerView, window: int, pooling: str, kernel: int, kv_head_of=None) -> torch.Tensor:
    """Observation-window scores [B, Hkv, S]; ``kv_head_of(h, Hq, Hkv)`` pairs query and KV heads."""
    q, k = view.queries.float(), view.keys.float()
    batch, hq, seq, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    kv_head_of = kv_head_of or (lambda h, _hq, _hkv: h // group)
    w = min(window, seq)
    out = torch.zeros(batch, hkv, seq)
    for b in range(batch):
        for h in range(hq):
            kh = kv_head_of(h, hq, hkv)
            summed = torch.zeros(seq)
            for i in range(seq - w, seq):
                if not view.valid[b, i]:
                    continue  # padding observation query: contributes zeros
                allowed = view.valid[b] & (view.positions[b] <= view.positions[b, i])
                logits = (k[b, kh] @ q[b, h, i]) * view.scaling
                probs = torch.zeros(seq)
                probs[allowed] = torch.softmax(logits[allowed], dim=0)
                summed += probs
            pooled = torch.zeros(seq)
            for j in range(seq):
                nbrs = summed[max(0, j - kernel // 2) : j + kernel // 2 + 1]
                pooled[j] = nbrs.max() if pooling == "max" else nbrs.sum() / kernel
            out[b, kh] += pooled
    return out


def ref_budget(n: int, rate: float | None, tokens: int | None) -> int:
    return min(n, tokens) if tokens is not None else min(n, math.floor(rate * n + 0.5))


def ref_pick(scores: list[float], valid: list[bool], n: int, window: int, budget: int) -> list[bool]:
    """Last min(window, n) valid entries, then the best remaining valid ones (earlier index on ties)."""
    seq = len(scores)
    recent = [j for j in range(seq) if valid[j]][-min(window, n) :]
    rest = sorted((j for j in range(seq) if valid[j] and j not in recent), key=lambda j: (-scores[j], j))
    chosen = set(recent) | set(rest[: budget - len(recent)])
    return [j in chosen for j in range(seq)]


def ref_select(scores: torch.Tensor, view: LayerView, window: int, budget_of) -> torch.Tensor:
    """Apply ``ref_pick`` to every row (and head) of ``scores`` [B, S] or [B, H, S]."""
    rows = scores[:, None] if scores.dim() == 2 else scores
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for b in range(rows.shape[0]):
        n = int(view.prompt_lengths[b])
        for h in range(rows.shape[1]):
            picked = ref_pick(rows[b, h].tolist(), view.valid[b].tolist(), n, window, budget_of(n))
            out[b, h] = torch.tensor(picked)
    return out[:, 0] if scores.dim() == 2 else out


# ---------------------------------------------------------------- helpers


def make_view(queries, keys, lengths, layer_idx=0, num_layers=1) -> LayerView:
    """Left-padded prefill view: row b has its lengths[b] tokens at the right, positions 0..n-1."""
    batch, _, seq, dim = keys.shape
    valid = torch.zeros(batch, seq, dtype=torch.bool)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        valid[b, seq - n :] = True
        positions[b, seq - n :] = torch.arange(n)
    return LayerView(layer_idx, num_layers, queries, keys, torch.randn_like(keys), positions, valid,
                     torch.tensor(lengths), dim**-0.5, None)  # fmt: skip


def make_fastkv(hq: int, hkv: int, num_layers: int = 1, **cfg) -> FastKV:
    info = ModelInfo(num_layers, hq, hkv, ("full_attention",) * num_layers)
    return FastKV(FastKVConfig(**cfg), info)


def same_ranking(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> bool:
    """True if a and b order every pair of valid entries of each row the same way (>, ==, <)."""
    sign = lambda x: torch.sign(x[..., :, None] - x[..., None, :])  # noqa: E731
    pair_valid = (valid[..., :, None] & valid[..., None, :]).expand_as(sign(a))
    return bool(torch.equal(sign(a)[pair_valid], sign(b)[pair_valid]))


def pooled_grid(gen: torch.Generator, shape: tuple, dim: int, scale: float) -> torch.Tensor:
    """Vectors drawn from a pool of at most 4 with entries in {-1, 0, 1} * scale: many exact ties."""
    pool = torch.randint(-1, 2, (int(torch.randint(1, 5, (1,), generator=gen)), dim), generator=gen)
    return pool[torch.randint(0, pool.shape[0], shape, generator=gen)].float() * scale


# ---------------------------------------------------------------- property test


@st.composite
def cases(draw):
    seq = draw(st.integers(1, 40))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)] if draw(st.booleans()) else [seq] * batch
    cfg = {"pooling": draw(st.sampled_from(["max", "avg"])), "kernel": draw(st.sampled_from([1, 3, 5, 7]))}
    if draw(st.booleans()):
        cfg.update(budget_mode="constant", window=draw(st.integers(1, 10)))
        cfg.update(tsp_tokens=draw(st.integers(cfg["window"], 45)),
                   retain_tokens=draw(st.integers(cfg["window"], 45)))  # fmt: skip
    else:
        cfg.update(tsp_rate=draw(st.floats(0.05, 1.0)), retain_rate=draw(st.floats(0.05, 1.0)))
        # The last min(window, n) tokens must fit in every budget that does not cover the whole row.
        tight = [ref_budget(n, r, None) for n in lengths for r in (cfg["tsp_rate"], cfg["retain_rate"])
                 if ref_budget(n, r, None) < n]  # fmt: skip
        max_window = min([10, *tight])
        assume(max_window >= 1)
        cfg["window"] = draw(st.integers(1, max_window))
    num_layers = draw(st.integers(1, 4))
    cfg["tsp_layer"] = draw(st.integers(0, num_layers - 1))
    shape = {"batch": batch, "seq": seq, "hkv": draw(st.integers(1, 3)), "groups": draw(st.integers(1, 3)),
             "dim": draw(st.sampled_from([4, 8])), "scale": draw(st.sampled_from([0.5, 32.0])),
             "layer_idx": draw(st.integers(0, num_layers - 1)), "num_layers": num_layers,
             "seed": draw(st.integers(0, 2**31 - 1))}  # fmt: skip
    return lengths, cfg, shape


@settings(max_examples=200, deadline=None)
@given(cases())
def test_library_matches_reference(case):
    """Scores match the reference closely; retain and propagate masks match it exactly.

    scale 0.5 gives soft attention, scale 32 near one-hot attention (exact 0/1 probabilities).
    """
    lengths, cfg, s = case
    gen = torch.Generator().manual_seed(s["seed"])
    hq = s["hkv"] * s["groups"]
    queries = pooled_grid(gen, (s["batch"], hq, s["seq"]), s["dim"], s["scale"])
    keys = pooled_grid(gen, (s["batch"], s["hkv"], s["seq"]), s["dim"], s["scale"])
    view = make_view(queries, keys, lengths, s["layer_idx"], s["num_layers"])
    strategy = make_fastkv(hq, s["hkv"], s["num_layers"], **cfg)

    scores = strategy.score(layer=view)
    expected = ref_scores(view, cfg["window"], cfg["pooling"], cfg["kernel"])
    assert scores.shape == (s["batch"], s["hkv"], s["seq"])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    valid3 = view.valid[:, None].expand_as(scores)
    assume(same_ranking(scores, expected, valid3))
    assume(same_ranking(scores.sum(1), expected.sum(1), view.valid))

    def budget_of(kind):  # constant mode sets only *_tokens, proportional only *_rate
        return lambda n: ref_budget(n, cfg.get(f"{kind}_rate"), cfg.get(f"{kind}_tokens"))

    keep = strategy.retain(layer=view, scores=scores)
    assert torch.equal(keep, ref_select(expected, view, cfg["window"], budget_of("retain")))
    prop = strategy.propagate(layer=view, scores=scores)
    if s["layer_idx"] != cfg["tsp_layer"]:
        assert prop is None
    else:
        assert torch.equal(prop, ref_select(expected.sum(1), view, cfg["window"], budget_of("tsp")))


# ---------------------------------------------------------------- hand-made examples


def one_hot(seq: int, dim: int, rows: dict[int, int], scale: float = 8.0) -> torch.Tensor:
    """[seq, dim] zeros except row i = scale * e_{rows[i]}."""
    out = torch.zeros(seq, dim)
    for i, d in rows.items():
        out[i, d] = scale
    return out


def test_window_one_keeps_the_key_the_last_query_attends_to():
    """Window 1, budget 2: the last token is always kept, plus key 2, the one it attends to."""
    keys = one_hot(6, 4, {2: 0})[None, None]
    queries = one_hot(6, 4, {5: 0})[None, None]
    view = make_view(queries, keys, [6])
    fastkv = make_fastkv(1, 1, window=1, kernel=1, tsp_layer=0, budget_mode="constant",
                         retain_tokens=2, tsp_tokens=2)  # fmt: skip
    scores = fastkv.score(layer=view)
    assert int(scores[0, 0].argmax()) == 2
    expected = torch.tensor([False, False, True, False, False, True])
    assert torch.equal(fastkv.retain(layer=view, scores=scores)[0, 0], expected)
    assert torch.equal(fastkv.propagate(layer=view, scores=scores)[0], expected)


def test_exact_tie_goes_to_the_earlier_position():
    """Identical keys at 3 and 5 (row left-padded by 2) tie exactly: the earlier one, 3, is kept."""
    keys = one_hot(8, 4, {3: 0, 5: 0})[None, None]
    queries = one_hot(8, 4, {7: 0})[None, None]
    view = make_view(queries, keys, [6])
    fastkv = make_fastkv(1, 1, window=1, kernel=1, tsp_layer=0, retain_rate=0.34, tsp_rate=0.34)
    scores = fastkv.score(layer=view)
    assert scores[0, 0, 3] == scores[0, 0, 5] > scores[0, 0, 4]
    expected = torch.zeros(8, dtype=torch.bool)
    expected[[3, 7]] = True  # budget round(0.34 * 6) = 2: the last token and the earlier tie
    assert torch.equal(fastkv.retain(layer=view, scores=scores)[0, 0], expected)
    assert torch.equal(fastkv.propagate(layer=view, scores=scores)[0], expected)


def test_max_pooling_plateau_keeps_its_first_entry():
    """Max pooling (kernel 3) spreads the peak at key 4 over keys 3..5; the tie goes to key 3."""
    keys = one_hot(8, 4, {4: 0})[None, None]
    queries = one_hot(8, 4, {7: 0})[None, None]
    view = make_view(queries, keys, [8])
    fastkv = make_fastkv(1, 1, window=1, kernel=3, pooling="max", budget_mode="constant",
                         retain_tokens=2, tsp_tokens=2)  # fmt: skip
    scores = fastkv.score(layer=view)
    assert scores[0, 0, 3] == scores[0, 0, 4] == scores[0, 0, 5]
    keep = fastkv.retain(layer=view, scores=scores)[0, 0]
    assert keep.nonzero().flatten().tolist() == [3, 7]


def test_gqa_pairs_query_head_h_with_kv_head_h_div_groups():
    """Hq=4, Hkv=2: query heads 0,1 read KV head 0 and 2,3 read KV head 1 (h // G, not h % Hkv).

    Both KV heads hold e0 at key 1 and e1 at key 3. Query heads: 0 and 3 look nowhere in
    particular, 1 looks for e0, 2 for e1. With h // G, KV head 0 (heads 0,1) favours key 1 and
    KV head 1 (heads 2,3) key 3; pairing by h % Hkv would swap them.
    """
    keys = one_hot(6, 4, {1: 0, 3: 1})[None, None].repeat(1, 2, 1, 1)
    queries = torch.zeros(1, 4, 6, 4)
    queries[0, 1, 5, 0] = queries[0, 2, 5, 1] = 8.0
    view = make_view(queries, keys, [6])
    fastkv = make_fastkv(4, 2, window=1, kernel=1, budget_mode="constant", retain_tokens=2, tsp_tokens=2)
    scores = fastkv.score(layer=view)
    keep = fastkv.retain(layer=view, scores=scores)
    assert keep[0, 0].nonzero().flatten().tolist() == [1, 5]
    assert keep[0, 1].nonzero().flatten().tolist() == [3, 5]

    right = ref_scores(view, 1, "max", 1)
    wrong = ref_scores(view, 1, "max", 1, kv_head_of=lambda h, _hq, hkv: h % hkv)
    torch.testing.assert_close(scores, right)
    budget = lambda n: 2  # noqa: E731
    assert torch.equal(keep, ref_select(right, view, 1, budget))
    assert not torch.equal(keep, ref_select(wrong, view, 1, budget))
