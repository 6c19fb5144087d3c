"""What the strategy tests share: plain-PyTorch references, inputs, hypothesis strategies, checks.

Imported by ``test_selection_reference.py`` and ``test_strategy_*.py`` as
``from strategy_reference import ...``. It provides

* inputs: ``left_padding`` / ``make_view`` (left-padded prefill ``LayerView``), ``grid_view`` (one
  from small pools of {-1, 0, 1} * scale vectors, ``pooled_grid``, so dot products are exact and
  exact ties are common), ``one_hot`` rows for hand-made examples, ``make_strategy`` (a strategy
  on a model of full-attention layers) and ``assert_hooks_read_nothing_back`` (meta tensors);
* references written from the papers' definitions with plain loops: ``ref_budget`` / ``budget_of``
  (rate rounded half up, or a token count), ``ref_window_scores`` (softmax votes of the last
  ``window`` queries, or of all of them, optionally pooled over keys, summed per KV head) and
  ``ref_pick`` / ``ref_keep`` / ``ref_select`` (the recent window, then the best other valid
  entries, ties to the earlier index), plus ``same_ranking`` to skip float near-ties;
* hypothesis strategies: ``padded_lengths``, ``budget_settings``, ``grid_shape``;
* end-to-end checks on the tiny models (``ROWS``, ``CONTEXT``, the ``each_*`` parametrisations,
  ``kept_positions_end_to_end``, ``assert_window_kept``, ``keep_everything_and_full``), the SmolLM2
  passkey run, and the bad-settings pattern (``bad_settings`` and ``config_error``).

The references use nothing from ``kvpress_like.selection`` or ``kvpress_like.budget``. Assertions
here carry their operands as messages: pytest does not rewrite the asserts of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st

from kvpress_like import ConfigError, pipeline
from kvpress_like.eval.passkey import passkey_prompt
from kvpress_like.hookspecs import LayerView
from kvpress_like.plugins import ModelInfo

from conftest import tiny_model

# ---------------------------------------------------------------- inputs


def left_padding(lengths: Sequence[int], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid mask and positions [B, S] of left-padded rows: row b holds 0..n-1 in its last n slots."""
    valid = torch.zeros(len(lengths), seq, dtype=torch.bool)
    positions = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        valid[b, seq - n :] = True
        positions[b, seq - n :] = torch.arange(n)
    return valid, positions


def make_view(queries, keys, lengths, layer_idx: int = 0, num_layers: int = 1) -> LayerView:
    """Left-padded prefill view: row b has its lengths[b] tokens at the right, positions 0..n-1."""
    valid, positions = left_padding(lengths, keys.shape[2])
    return LayerView(layer_idx, num_layers, queries, keys, torch.randn_like(keys), positions, valid,
                     torch.tensor(lengths), keys.shape[-1] ** -0.5, None)  # fmt: skip


def pooled_grid(gen: torch.Generator, shape: tuple, dim: int, scale: float) -> torch.Tensor:
    """Vectors drawn from a pool of at most 4 with entries in {-1, 0, 1} * scale: many exact ties."""
    pool = torch.randint(-1, 2, (int(torch.randint(1, 5, (1,), generator=gen)), dim), generator=gen)
    return pool[torch.randint(0, pool.shape[0], shape, generator=gen)].float() * scale


def grid_view(lengths: list[int], shape: dict) -> tuple[torch.Generator, LayerView]:
    """The view of a ``grid_shape`` draw (queries, then keys, from ``pooled_grid``) and its generator."""
    gen = torch.Generator().manual_seed(shape["seed"])
    hq = shape["hkv"] * shape["groups"]
    queries = pooled_grid(gen, (shape["batch"], hq, shape["seq"]), shape["dim"], shape["scale"])
    keys = pooled_grid(gen, (shape["batch"], shape["hkv"], shape["seq"]), shape["dim"], shape["scale"])
    return gen, make_view(queries, keys, lengths, shape.get("layer_idx", 0), shape.get("num_layers", 1))


def one_hot(seq: int, dim: int, rows: dict[int, int], scale: float = 8.0) -> torch.Tensor:
    """[seq, dim] zeros except row i = scale * e_{rows[i]}."""
    out = torch.zeros(seq, dim)
    for i, d in rows.items():
        out[i, d] = scale
    return out


def make_strategy(cls: type, hq: int, hkv: int, num_layers: int = 1, **settings):
    """``cls`` with ``cls.Config(**settings)`` on a model of ``num_layers`` full-attention layers."""
    return cls(cls.Config(**settings), ModelInfo(num_layers, hq, hkv, ("full_attention",) * num_layers))


def assert_hooks_read_nothing_back(strategy, hq: int, hkv: int, num_layers: int = 6) -> None:
    """score then retain on meta tensors (no data: any host sync raises), at every layer index."""
    batch, seq, dim = 2, 32, 8
    meta = dict(device="meta")
    for layer_idx in range(num_layers):
        view = LayerView(layer_idx, num_layers, torch.empty(batch, hq, seq, dim, **meta),
                         torch.empty(batch, hkv, seq, dim, **meta), torch.empty(batch, hkv, seq, dim, **meta),
                         torch.empty(batch, seq, dtype=torch.long, **meta),
                         torch.empty(batch, seq, dtype=torch.bool, **meta),
                         torch.empty(batch, dtype=torch.long, **meta), dim**-0.5, None)  # fmt: skip
        keep = strategy.retain(layer=view, scores=strategy.score(layer=view))
        assert keep.shape == (batch, hkv, seq) and keep.dtype == torch.bool, (keep.shape, keep.dtype)


# ---------------------------------------------------------------- references (paper definitions)


def ref_budget(n: int, rate: float | None, tokens: int | None) -> int:
    """Rate of the prompt rounded half up (proportional) or a token count, at most the prompt."""
    return min(n, tokens) if tokens is not None else min(n, math.floor(rate * n + 0.5))


def budget_of(settings: dict, kind: str = "retain") -> Callable[[int], int]:
    """n -> ``ref_budget`` from ``{kind}_rate`` (proportional) or ``{kind}_tokens`` (constant)."""
    return lambda n: ref_budget(n, settings.get(f"{kind}_rate"), settings.get(f"{kind}_tokens"))


def ref_pool(votes: torch.Tensor, pooling: str, kernel: int) -> torch.Tensor:
    """Stride-1 pooling of [S] over keys with zero padding: max, or the sum / kernel ("avg")."""
    pooled = torch.zeros_like(votes)
    for j in range(len(votes)):
        near = votes[max(0, j - kernel // 2) : j + kernel // 2 + 1]
        pooled[j] = near.max() if pooling == "max" else near.sum() / kernel
    return pooled


def ref_window_scores(
    view: LayerView,
    window: int | None,
    pooling: str | None = None,
    kernel: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    kv_head_of: Callable[[int, int, int], int] | None = None,
) -> torch.Tensor:
    """[B, Hkv, S] float32: votes of the last ``window`` (None: all) queries, pooled, summed per KV head."""
    # Each valid query's softmax (computed in ``dtype``) over the keys it may see (valid, position
    # not after its own) is summed over the queries; ``pooling`` None leaves the sums unpooled.
    # Pooling follows SnapKV's Algorithm 1 (``attn_weights[..., :-window_size]`` pooled, the
    # window's own entries kept apart): only the keys before the window are pooled, among
    # themselves; the window's keys keep their sums. ``window`` None pools every key.
    # ``kv_head_of(h, Hq, Hkv)`` pairs query and KV heads (default ``h // (Hq // Hkv)``).
    q, k = view.queries.to(dtype), view.keys.to(dtype)
    batch, hq, seq, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    kv_head_of = kv_head_of or (lambda h, _hq, _hkv: h // group)
    first = 0 if window is None else seq - min(window, seq)
    out = torch.zeros(batch, hkv, seq, dtype=dtype)
    for b in range(batch):
        for h in range(hq):
            kv = kv_head_of(h, hq, hkv)
            votes = torch.zeros(seq, dtype=dtype)
            for i in range(first, seq):
                if not view.valid[b, i]:
                    continue  # padding queries attend nowhere
                seen = view.valid[b] & (view.positions[b] <= view.positions[b, i])
                logits = (k[b, kv] @ q[b, h, i]) * view.scaling
                votes[seen] += torch.softmax(logits[seen], dim=0)
            if pooling is not None:
                cut = seq if window is None else first
                votes = torch.cat([ref_pool(votes[:cut], pooling, kernel), votes[cut:]])
            out[b, kv] += votes
    return out.float()


def ref_pick(scores: list[float], valid: list[bool], window: int, budget: int) -> list[bool]:
    """Last min(window, n) of the n valid entries, then the best other valid ones (earlier on ties)."""
    idx = [j for j, v in enumerate(valid) if v]
    recent = idx[len(idx) - min(window, len(idx)) :]
    rest = sorted((j for j in idx if j not in recent), key=lambda j: (-scores[j], j))
    chosen = set(recent) | set(rest[: budget - len(recent)])
    return [j in chosen for j in range(len(valid))]


def ref_keep(scores: torch.Tensor, valid: torch.Tensor, window: int, row_budgets: list[int]) -> torch.Tensor:
    """``ref_pick`` for every row (budget ``row_budgets[b]``) and head of scores [B, S] or [B, H, S]."""
    rows = scores[:, None] if scores.dim() == 2 else scores
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for b in range(rows.shape[0]):
        for h in range(rows.shape[1]):
            out[b, h] = torch.tensor(ref_pick(rows[b, h].tolist(), valid[b].tolist(), window, row_budgets[b]))
    return out[:, 0] if scores.dim() == 2 else out


def ref_select(
    scores: torch.Tensor, view: LayerView, window: int, budget: Callable[[int], int]
) -> torch.Tensor:
    """``ref_keep`` with each row's budget ``budget(prompt length)``."""
    return ref_keep(scores, view.valid, window, [budget(int(n)) for n in view.prompt_lengths])


def same_ranking(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> bool:
    """True if a and b order every pair of valid entries of each row the same way (>, ==, <)."""
    sa = torch.sign(a[..., :, None] - a[..., None, :])
    sb = torch.sign(b[..., :, None] - b[..., None, :])
    pairs = (valid[..., :, None] & valid[..., None, :]).expand_as(sa)
    return bool(torch.equal(sa[pairs], sb[pairs]))


# ---------------------------------------------------------------- hypothesis strategies


@st.composite
def padded_lengths(draw, max_seq: int) -> tuple[int, list[int]]:
    """(S, lengths): 1 to 3 rows of at most S tokens, left-padded to S (or all full)."""
    seq = draw(st.integers(1, max_seq))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)] if draw(st.booleans()) else [seq] * batch
    return seq, lengths


@st.composite
def budget_settings(
    draw, lengths: list[int], max_tokens: int = 45, kinds: Sequence[str] = ("retain",)
) -> dict:
    """Valid ``window`` and budget settings per kind: constant, or proportional with a window that fits."""
    if draw(st.booleans()):
        cfg: dict = {"budget_mode": "constant", "window": draw(st.integers(1, 10))}
        for kind in kinds:
            cfg[f"{kind}_tokens"] = draw(st.integers(cfg["window"], max_tokens))
        return cfg
    cfg = {f"{kind}_rate": draw(st.floats(0.05, 1.0)) for kind in kinds}
    # The last min(window, n) tokens must fit in every budget that does not cover the whole row.
    tight = [k for n in lengths for kind in kinds if (k := budget_of(cfg, kind)(n)) < n]
    assume(min([10, *tight]) >= 1)
    cfg["window"] = draw(st.integers(1, min([10, *tight])))
    return cfg


@st.composite
def grid_shape(draw, seq: int, lengths: list[int], max_hkv: int = 3) -> dict:
    """Shape, value scale and seed of a ``grid_view``: Hkv, query groups, head dim, scale 0.5 or 32."""
    return {"batch": len(lengths), "seq": seq, "hkv": draw(st.integers(1, max_hkv)),
            "groups": draw(st.integers(1, 3)), "dim": draw(st.sampled_from([4, 8])),
            "scale": draw(st.sampled_from([0.5, 32.0])), "seed": draw(st.integers(0, 2**31 - 1))}  # fmt: skip


# ---------------------------------------------------------------- end to end (tiny models, SmolLM2)

ROWS = {
    "batch1": [torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()],
    "batch2-left-padded": [
        torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(4)).tolist(),
        torch.randint(3, 256, (27,), generator=torch.Generator().manual_seed(5)).tolist(),
    ],
}
CONTEXT = torch.randint(3, 256, (50,), generator=torch.Generator().manual_seed(3)).tolist()

each_family = pytest.mark.parametrize("family", ["llama", "qwen3"])
each_row_set = pytest.mark.parametrize("rows", sorted(ROWS))
each_context_batch = pytest.mark.parametrize(
    "rows", [[CONTEXT], [CONTEXT, CONTEXT[13:]]], ids=["batch1", "batch2-left-padded"]
)


def kept_positions_end_to_end(
    family: str, name: str, settings: dict, budget: Callable[[int], int], prompts: list[list[int]],
    *, whole_prompt_every_layer: bool = True,
) -> list[list[list[list[int]]]]:  # fmt: skip
    """Assert every layer keeps budget(n) per row and KV head (stats, cache); kept positions [L][B][H]."""
    model = tiny_model(family)
    budgets = [budget(len(p)) for p in prompts]
    pipe = pipeline(model, name, max_new_tokens=3, stop_on_eos=False, **settings)
    stats = pipe(prompts).stats
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert stats.kv_kept_per_layer == [[float(k) for k in budgets]] * layers, stats.kv_kept_per_layer
    if whole_prompt_every_layer:  # no propagation
        assert stats.tokens_per_layer == [[len(p) for p in prompts]] * layers, stats.tokens_per_layer
    kept = []
    for layer in pipe.compress(prompts).cache.layers:
        counts = layer.valid.sum(-1).tolist()
        assert counts == [[k] * heads for k in budgets], (counts, budgets)
        kept.append([[layer.positions[b, h][layer.valid[b, h]].tolist() for h in range(heads)]
                     for b in range(len(prompts))])  # fmt: skip
    return kept


def assert_window_kept(kept: list[list[list[list[int]]]], prompts: list[list[int]], window: int) -> None:
    """Every layer and head of ``kept_positions_end_to_end`` keeps its row's last ``window`` positions."""
    for layer in kept:
        for heads, n in zip(layer, map(len, prompts), strict=True):
            for positions in heads:
                assert positions[-window:] == list(range(n - window, n)), (positions, n, window)


def keep_everything_and_full(model, name: str, rows, max_new_tokens: int, **settings):
    """Greedy outputs (kept, full) of ``name`` at retain_rate 1.0 and of ``full``; same tokens asserted."""
    gen = dict(max_new_tokens=max_new_tokens, stop_on_eos=False)
    full = pipeline(model, "full", **gen)(rows)
    kept = pipeline(model, name, retain_rate=1.0, **settings, **gen)(rows)
    assert kept.token_ids == full.token_ids, (kept.token_ids, full.token_ids)
    return kept, full


def smollm2_passkey_run(smollm2, name: str, **settings):
    """(pipe, prompt, output) of ``name`` on a ~300-token SmolLM2 passkey prompt, 5 new tokens at most."""
    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 300, 0.5, seed=0)
    pipe = pipeline(model, name, tokenizer=tokenizer, chat_template=False, max_new_tokens=5, **settings)
    return pipe, prompt, pipe(prompt.text)


def assert_smollm2_keeps_default_budget(smollm2, name: str, **settings) -> None:
    """On the passkey run every layer keeps round(0.1 * n), the default retain_rate; 1 to 5 new tokens."""
    _, _, out = smollm2_passkey_run(smollm2, name, **settings)
    n = out.stats.prompt_tokens[0]
    assert 250 <= n <= 350, n
    budget = math.floor(0.1 * n + 0.5)
    kept = out.stats.kv_kept_per_layer
    assert kept == [[float(budget)]] * smollm2[0].config.num_hidden_layers, (kept, budget)
    assert 1 <= len(out.ids) <= 5, out.ids


# ---------------------------------------------------------------- bad settings


def bad_settings(cases: list[tuple[dict, list[str]]]):
    """Parametrise a test over (settings, expected message fragments) pairs."""
    return pytest.mark.parametrize(("settings", "expected"), cases)


def config_error(name: str, settings: dict, expected: Sequence[str] = (), prompt=None) -> str:
    """The ConfigError message of ``name`` on tiny llama (built, or run on ``prompt``); has ``expected``."""
    if prompt is None:
        with pytest.raises(ConfigError) as err:
            pipeline(tiny_model("llama"), name, **settings)
    else:
        pipe = pipeline(tiny_model("llama"), name, **settings)  # builds: only running it fails
        with pytest.raises(ConfigError) as err:
            pipe(prompt)
    message = str(err.value)
    for fragment in expected:
        assert fragment in message, (fragment, message)
    return message
