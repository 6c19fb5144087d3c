"""Fuzzing the public API: every input gives the reference result or a ``KvpressLikeError``.

For every drawn input a pipeline call (and building the pipeline) either

* returns what the reference gives (plain ``model.generate`` for strategy ``full`` with greedy
  decoding; the plugin's own mask for the KV entries a ``retain`` answer keeps), or
* raises an instance of ``kvpress_like.errors.KvpressLikeError`` with a non-empty message
  (a broken plugin: a ``PluginError`` naming the hook, chained to what the plugin raised),

never a raw torch / transformers / pydantic / Python exception and never a hang; and the wrapped
model is exactly as it was afterwards (parameters, every config's ``_attn_implementation``, no
instance attribute ``forward``; ``model.generate`` once at the end of each test).

Inputs are judged by an oracle of this file (``_prompt_rows``, ``_gen_kind``, ``_judge``), not by
the library: ``valid`` inputs must succeed with the reference result, ``invalid`` ones must be
refused, ``either`` ones (lax or borderline: bools as token ids, a string next to id rows, a
temperature of 1e-300, float16 scores) may be refused or must give the reference result.

Runs derandomized (fixed examples, no example database), so a failure repeats from run to run.
Counts of inputs and outcomes go to the JSON file named by ``KVPRESS_FUZZ_REPORT``, if set.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st

from kvpress_like import hookimpl, pipeline
from kvpress_like.config import EngineConfig
from kvpress_like.errors import KvpressLikeError, PluginError
from kvpress_like.plugins import list_strategies, load_strategy_class

from conftest import TINY_FASTKV, VOCAB, CharTokenizer, tiny_model

EOS, PAD = 2, 0
NUM_LAYERS, KV_HEADS, Q_HEADS = 4, 2, 4  # the tiny llama of conftest
CALL_LIMIT_S = 20.0  # no single call on these sizes comes near this: past it, a hang
REFUSE_HUGE_S = 2.0  # a huge max_new_tokens must be refused within this
HUGE_NEW_TOKENS = (10**7, 10**9, 2**63, 10**30)
NEW_TOKENS = 3  # per call on the "full" pipeline of the prompt and generation tests
TOK = CharTokenizer()

FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

# ---------------------------------------------------------------- counting, for the summary

OUTCOMES: dict[str, Counter] = defaultdict(Counter)
CHECKS: dict[str, Counter] = defaultdict(Counter)  # reference comparisons made, per test
INPUTS: dict[str, set[int]] = defaultdict(set)
STARTED = time.perf_counter()


def _record(test: str, key: str, outcome: str) -> None:
    OUTCOMES[test][outcome] += 1
    INPUTS[test].add(hash(key))


@pytest.fixture(scope="session", autouse=True)
def _fuzz_report():
    """At the end of the session: inputs tried and outcome classes per test, as JSON."""
    yield
    if not OUTCOMES:
        return
    summary = {
        "seconds": round(time.perf_counter() - STARTED, 1),
        "tests": {
            test: {
                "examples_run": sum(OUTCOMES[test].values()),
                "distinct_inputs": len(INPUTS[test]),
                "outcomes": dict(sorted(OUTCOMES[test].items())),
                "reference_checks": dict(sorted(CHECKS[test].items())),
            }
            for test in sorted(OUTCOMES)
        },
    }
    text = json.dumps(summary, indent=2)
    if path := os.environ.get("KVPRESS_FUZZ_REPORT"):
        Path(path).write_text(text + "\n")
    print("\nkvpress_like fuzz summary:\n" + text)


# ---------------------------------------------------------------- the model, checked and restored


def _configs(model) -> dict[int, Any]:
    return {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}


def _light_snapshot(model) -> dict:
    return {
        "attn": sorted((type(c).__name__, c._attn_implementation) for c in _configs(model).values()),
        "forward_attrs": sorted(name for name, m in model.named_modules() if "forward" in vars(m)),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "training": [m.training for m in model.modules()],
    }


GENERATE_PROMPT = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(11))


def _generate(model) -> list[int]:
    with torch.no_grad():
        return model.generate(
            GENERATE_PROMPT,
            attention_mask=torch.ones_like(GENERATE_PROMPT),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=PAD,
        )[0].tolist()


class TinyModel:
    """The module's tiny llama (fp32), its snapshot, and the after-every-example check."""

    def __init__(self) -> None:
        self.model = tiny_model("llama")
        assert self.model.dtype == torch.float32
        self.attn = {key: c._attn_implementation for key, c in _configs(self.model).items()}
        self.light = _light_snapshot(self.model)
        assert self.light["forward_attrs"] == []
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.generated = _generate(self.model)
        self.pipe = None  # _full_pipe's

    def changes(self) -> list[str]:
        """What differs from the snapshot (cheap: no forward pass)."""
        found = []
        now = _light_snapshot(self.model)
        for key, before in self.light.items():
            if now[key] != before:
                found.append(f"{key}: {before!r} -> {now[key]!r}")
        state = self.model.state_dict()
        if state.keys() != self.state.keys():
            found.append(f"state_dict keys: {sorted(set(state) ^ set(self.state))}")
        found += [
            f"parameter {k} changed"
            for k, v in self.state.items()
            if k in state and not torch.equal(state[k], v)
        ]
        return found

    def restore(self) -> None:
        """Put the model back, so that one broken example does not break the next ones."""
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if k in self.state:
                    v.copy_(self.state[k])
        for key, cfg in _configs(self.model).items():
            if key in self.attn:
                cfg._attn_implementation = self.attn[key]
        for m in self.model.modules():
            vars(m).pop("forward", None)
        self.model.eval()

    def check(self, exc: BaseException | None = None) -> None:
        if changes := self.changes():
            self.restore()
            message = "property violated: the wrapped model is unchanged after a call; " + "; ".join(changes)
            raise AssertionError(message) from exc

    def generate_changes(self) -> str | None:
        now = _generate(self.model)
        if now != self.generated:
            return f"model.generate on a fixed prompt changed: {self.generated} -> {now}"
        return None


def _full_pipe(tiny: TinyModel):
    """Strategy ``full`` with the char tokenizer and 3 new tokens, built once per model."""
    if tiny.pipe is None:
        tiny.pipe = pipeline(tiny.model, "full", tokenizer=TOK, max_new_tokens=NEW_TOKENS)
    return tiny.pipe


@pytest.fixture(scope="module")
def tiny():
    return TinyModel()


@pytest.fixture(scope="module", autouse=True)
def _memory_guard():
    """A huge ``max_new_tokens`` that is not refused may try to allocate tens of GiB: cap this
    process's address space for the module, so that it fails (and is reported) instead of the
    machine swapping or the test run being killed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    cap = size + (8 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _fuzz(tiny: TinyModel, run: Callable[[], None]) -> None:
    """Run a hypothesis test, then compare ``model.generate`` once (also after a failure)."""
    try:
        run()
    except BaseException as exc:
        if (message := tiny.generate_changes()) is not None:
            exc.add_note("and " + message)
        raise
    message = tiny.generate_changes()
    assert message is None, message


# ---------------------------------------------------------------- one guarded call


def _note(text: str) -> None:
    """Shown with a failing example: hypothesis' note inside @given, else captured stdout."""
    if currently_in_test_context():
        note(text)
    else:
        print(text)


class _Alarm(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    fired = []

    def handler(signum, frame):
        fired.append(True)
        raise _Alarm(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    value: Any = None
    error: KvpressLikeError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _attempt(
    tiny: TinyModel, test: str, key: str, fn: Callable[[], Any], limit: float = CALL_LIMIT_S
) -> Outcome:
    """Call ``fn``: its value, or the KvpressLikeError it raised; anything else fails the example
    (re-raised where it was raised, so hypothesis tells distinct bugs apart by their origin)."""
    start = time.perf_counter()
    try:
        with _time_limit(limit) as fired:
            try:
                value = fn()
            finally:
                seconds = time.perf_counter() - start
    except BaseException as exc:
        if fired:
            _record(test, key, "hang")
            tiny.restore()
            raise AssertionError(
                f"property violated: no hang (no answer within {limit} s); got {type(exc).__name__}: {exc}"
            ) from None
        if isinstance(exc, KvpressLikeError):
            _record(test, key, type(exc).__name__)
            tiny.check(exc)
            assert str(exc).strip(), f"property violated: a non-empty message ({type(exc).__name__})"
            return Outcome(error=exc, seconds=seconds)
        _record(test, key, f"raw:{type(exc).__name__}")
        tiny.check(exc)
        exc.add_note(
            f"property violated: only KvpressLikeError may escape a pipeline call "
            f"(got {type(exc).__module__}.{type(exc).__name__})"
        )
        raise
    _record(test, key, "ok")
    tiny.check()
    return Outcome(value=value, seconds=seconds)


def _must_refuse(out: Outcome, why: str) -> None:
    assert not out.ok, (
        f"property violated: must be refused with a KvpressLikeError ({why}); got {out.value!r}"
    )


def _must_succeed(out: Outcome, why: str) -> None:
    if not out.ok:
        raise AssertionError(
            f"property violated: must succeed ({why}); got {type(out.error).__name__}: {out.error}"
        ) from out.error


# ---------------------------------------------------------------- the reference

_REFERENCE: dict[tuple[tuple[int, ...], int], list[int]] = {}


def _reference(tiny: TinyModel, row: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of ``model.generate`` on one unpadded row, cut after the first EOS."""
    key = (tuple(row), new_tokens)
    if key not in _REFERENCE:
        ids = torch.tensor([row])
        with torch.no_grad():
            out = tiny.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=PAD,
                eos_token_id=EOS,
            )[0, len(row) :].tolist()
        _REFERENCE[key] = out[: out.index(EOS) + 1] if EOS in out else out
    return _REFERENCE[key]


def _check_tokens(token_ids: Any, rows: int, new_tokens: int, stop_on_eos: bool) -> None:
    """Shape of any generation: one list per row, ids in the vocabulary, the right length."""
    assert isinstance(token_ids, list) and len(token_ids) == rows, token_ids
    for row in token_ids:
        assert all(type(t) is int and 0 <= t < VOCAB for t in row), row
        if stop_on_eos:
            assert 1 <= len(row) <= new_tokens, (row, new_tokens)
            assert EOS not in row[:-1], row
            assert len(row) == new_tokens or row[-1] == EOS, row
        else:
            assert len(row) == new_tokens, (row, new_tokens)


def _check_greedy(
    test: str,
    tiny: TinyModel,
    token_ids: list[list[int]],
    rows: list[list[int]],
    new_tokens: int,
    stop_on_eos: bool = True,
) -> None:
    """Per row, the tokens of ``model.generate`` on that row alone (unpadded)."""
    CHECKS[test]["greedy_rows_vs_model_generate"] += len(rows)
    for i, (got, row) in enumerate(zip(token_ids, rows, strict=True)):
        expected = _reference(tiny, row, new_tokens)
        if stop_on_eos:
            assert got == expected, f"row {i} ({row}): got {got}, reference {expected}"
        else:  # the reference stops at EOS; the pipeline goes on to new_tokens
            assert got[: len(expected)] == expected, f"row {i} ({row}): got {got}, reference {expected}"


def _check_stats(stats: Any, rows: list[list[int]]) -> None:
    lengths = [len(r) for r in rows]
    assert stats.prompt_tokens == lengths, (stats.prompt_tokens, lengths)
    assert len(stats.tokens_per_layer) == NUM_LAYERS and len(stats.kv_kept_per_layer) == NUM_LAYERS
    for layer in stats.kv_kept_per_layer:
        assert len(layer) == len(rows)
        assert all(0 <= kept <= n for kept, n in zip(layer, lengths, strict=True)), (layer, lengths)


# ================================================================ 1. configs

INSTALLED = sorted(list_strategies())
STRATEGY_FIELDS = sorted({f for name in INSTALLED for f in load_strategy_class(name).Config.model_fields})
# transformers' GenerationConfig fields drawn here, next to the engine's own
SAMPLING_FIELDS = ["max_new_tokens", "do_sample", "temperature", "top_p"]
GENERATION_FIELDS = sorted([*EngineConfig.model_fields, *SAMPLING_FIELDS])
JUNK_NAMES = ["", "FASTKV", "fastkv ", " full", "nope", "full\x00", "__init__", "fast-kv", "kv" * 40]
# Not "model", "strategy", "tokenizer", "plugins": pipeline's own parameters (a Python TypeError).
JUNK_KEYS = [
    "",
    "foo",
    "Window",
    "window ",
    "retain-rate",
    "tsp_rate_",
    "max_tokens",
    "__class__",
    "model_config",
    "settings",
    "generation",
    "name",
    "kernel_size",
    "Config",
    "config",
]

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.sampled_from([*HUGE_NEW_TOKENS, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 1e-300, -1.0, math.nan, math.inf]),
    st.text(max_size=6),
    st.sampled_from(["max", "avg", "constant", "proportional", "eager", "static", "auto"]),
    st.lists(st.integers(-2, 5), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2),
)
RATE = st.floats(0.05, 1.0)
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "max_new_tokens": st.integers(1, 4),
    "do_sample": st.booleans(),
    "temperature": st.floats(0.1, 2.0),
    "top_p": st.floats(0.1, 1.0),
    "seed": st.none() | st.integers(0, 100),
    "stop_on_eos": st.booleans(),
    "decode": st.sampled_from(["auto", "eager", "static"]),  # "compiled": minutes of inductor on CPU
    "prefill": st.just("eager"),
    "prefill_chunk": st.none() | st.integers(1, 32),
    "chat_template": st.none() | st.booleans(),
    "budget_mode": st.sampled_from(["proportional", "constant"]),
    "retain_rate": RATE,
    "retain_tokens": st.none() | st.integers(1, 30),
    "window": st.integers(1, 10),
    "pooling": st.sampled_from(["max", "avg"]),
    "kernel": st.integers(1, 9),
    "tsp_layer": st.none() | st.integers(0, 5),
    "tsp_rate": RATE,
    "tsp_tokens": st.none() | st.integers(1, 30),
    "floor": st.floats(0.0, 1.0),
    "filter_layer": st.none() | st.integers(0, 5),
    "chunk_size": st.integers(1, 40),
    "sink_tokens": st.integers(0, 8),
    "beta": st.floats(0.5, 30.0),
}


@st.composite
def configs(draw):
    """A strategy name (mostly installed), settings (mostly its own fields, mostly plausible
    values), and a prompt mostly long enough for the default budgets (rate 0.1 of 80 tokens: window 8)."""

    def often(p: int) -> bool:  # True about p times in 10 (uniform draws: junk stays rare)
        return draw(st.integers(0, 9)) < p

    if often(2):
        name = "full"  # the one with a reference beyond the shape of the result
    elif often(8):
        name = draw(st.sampled_from(INSTALLED))
    elif often(5):
        name = draw(st.sampled_from(JUNK_NAMES))
    else:
        name = draw(st.sampled_from([None, 0, 1.5, b"full", ["full"], object, load_strategy_class("full")]))
    own = sorted(load_strategy_class(name).Config.model_fields) if name in INSTALLED else []
    values = {}
    for _ in range(draw(st.integers(0, 4))):
        if own and often(5):
            key = draw(st.sampled_from(own))
        elif often(8):
            key = draw(st.sampled_from(GENERATION_FIELDS + STRATEGY_FIELDS))
        else:
            key = draw(st.sampled_from(JUNK_KEYS))
        plausible = PLAUSIBLE.get(key)
        values[key] = draw(plausible if plausible is not None and often(8) else ANY_VALUE)
    if "max_new_tokens" not in values:
        values["max_new_tokens"] = 2  # the default 32 only costs time
    lengths = [
        draw(st.integers(80, 120) if often(8) else st.integers(1, 80)) for _ in range(draw(st.integers(1, 2)))
    ]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    return name, values, rows


def _lax_generation(values: dict) -> SimpleNamespace | None:
    """The generation settings as the engine's config model and transformers' rules read them
    (None: refused). None for a transformers field means "not given"."""
    try:
        engine = EngineConfig.model_validate(
            {k: v for k, v in values.items() if k in EngineConfig.model_fields}
        )
    except Exception:
        return None
    new, sample = values.get("max_new_tokens"), values.get("do_sample")
    new = 32 if new is None else new  # the library's default when unset
    if type(new) is not int or new < 1 or sample not in (None, True, False):
        return None
    for name, high in (("temperature", math.inf), ("top_p", 1.0)):
        value = values.get(name)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= high
        ):
            return None
        if name == "temperature" and value is not None and not math.isfinite(value):
            return None
    return SimpleNamespace(max_new_tokens=new, do_sample=bool(sample), stop_on_eos=engine.stop_on_eos)


def _huge_new_tokens(value: Any) -> bool:
    return type(value) is int and value >= HUGE_NEW_TOKENS[0]


def check_config(tiny: TinyModel, case: Any) -> None:
    """Any strategy name and settings: a pipeline that answers one call, or a KvpressLikeError."""
    name, values, rows = case
    key = repr(case)
    _note(f"pipeline(model, {name!r}, **{values!r})({rows!r})")
    huge = _huge_new_tokens(values.get("max_new_tokens"))
    limit = 2 * REFUSE_HUGE_S if huge else CALL_LIMIT_S

    def build_and_call():
        pipe = pipeline(tiny.model, name, tokenizer=TOK, **values)
        return pipe(rows)

    out = _attempt(tiny, "configs", key, build_and_call, limit=limit)
    if huge:
        _must_refuse(out, f"max_new_tokens={values['max_new_tokens']}")
        assert out.seconds < REFUSE_HUGE_S, f"refused only after {out.seconds:.1f} s"
    if not out.ok:
        return
    gen = _lax_generation(values)
    assert gen is not None, f"accepted generation settings the config model refuses: {values}"
    _check_tokens(out.value.token_ids, len(rows), gen.max_new_tokens, gen.stop_on_eos)
    _check_stats(out.value.stats, rows)
    if name == "full":
        lengths = [len(r) for r in rows]
        assert out.value.stats.kv_kept_per_layer == [lengths] * NUM_LAYERS
        CHECKS["configs"]["full_keeps_every_entry"] += 1
        if not gen.do_sample:
            _check_greedy("configs", tiny, out.value.token_ids, rows, gen.max_new_tokens, gen.stop_on_eos)


def test_fuzz_configs(tiny):
    """Any strategy name and settings: a pipeline that answers one call, or a KvpressLikeError."""

    @settings(max_examples=120, **FUZZ)
    @given(configs())
    def run(case):
        check_config(tiny, case)

    _fuzz(tiny, run)


# ================================================================ 2. prompts

GOOD_ID = st.integers(0, VOCAB - 1)
BAD_ID = st.sampled_from(
    [-1, -255, VOCAB, VOCAB + 1, 10**6, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1]
)
GOOD_ROW = st.lists(GOOD_ID, min_size=1, max_size=10)
ANY_INT_ROW = st.lists(GOOD_ID | BAD_ID, max_size=10)
FLOAT_ROW = st.lists(
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, VOCAB - 1).map(float),
    min_size=1,
    max_size=6,
)
BOOL_ROW = st.lists(st.booleans(), min_size=1, max_size=6)
TEXT = st.text(max_size=12)
SCALAR = GOOD_ID | BAD_ID | st.booleans() | st.floats() | st.none() | st.text(max_size=3)
NESTED = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner), max_leaves=8
)
TENSOR_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(0, 10 if ndim == 1 else 4)) for _ in range(ndim)]
    numel = math.prod(shape)
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    elif dtype == torch.float32:
        values = draw(
            st.lists(
                st.floats(width=32, allow_nan=True) | st.integers(0, 255).map(float),
                min_size=numel,
                max_size=numel,
            )
        )
    else:
        low, high = {torch.uint8: (0, 255), torch.int32: (-(2**31), 2**31 - 1)}.get(
            dtype, (-(2**63), 2**63 - 1)
        )
        element = (
            st.integers(0, VOCAB - 1)
            | st.integers(max(low, -3), min(high, 300))
            | st.sampled_from([low, high])
        )
        values = draw(st.lists(element, min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=dtype).reshape(shape)


PROMPTS = st.one_of(
    GOOD_ROW,
    st.lists(GOOD_ROW, min_size=1, max_size=3),
    ANY_INT_ROW,
    st.lists(ANY_INT_ROW, min_size=1, max_size=3),
    TEXT,
    st.lists(TEXT, min_size=0, max_size=3),
    FLOAT_ROW,
    st.lists(FLOAT_ROW, min_size=1, max_size=2),
    BOOL_ROW,
    st.lists(BOOL_ROW, min_size=1, max_size=2),
    NESTED,
    tensors(),
    tensors(),
    st.lists(GOOD_ROW | TEXT | ANY_INT_ROW | BOOL_ROW | FLOAT_ROW | NESTED, max_size=3),  # mixtures
    st.tuples(GOOD_ID, GOOD_ID),
    st.binary(max_size=4),
    st.sampled_from([[], "", [[]], [[], [5]], [""], None, {}, {"input_ids": [5, 6]}, 5, 5.0, set()]),
)

VALID, EITHER, INVALID = "valid", "either", "invalid"


def _id_kind(x: Any) -> str:
    if type(x) is int:
        return VALID if 0 <= x < VOCAB else INVALID
    if type(x) is bool:
        return EITHER  # an int subclass: may be refused or read as 0/1
    return INVALID


def _is_row(x: Any) -> bool:
    return isinstance(x, str | list | tuple | bytes)


def _row(r: Any) -> tuple[str, list[int] | None]:
    """One prompt row: text (tokenized by CharTokenizer) or a sequence of token ids."""
    if isinstance(r, str):
        return (VALID, TOK(r)["input_ids"]) if r else (INVALID, None)
    if isinstance(r, bytes):  # a Sequence[int], but not ids anyone means
        return (EITHER, list(r)) if r else (INVALID, None)
    if isinstance(r, list | tuple) and r:
        kinds = {_id_kind(x) for x in r}
        if INVALID in kinds:
            return INVALID, None
        lax = EITHER in kinds or isinstance(r, tuple)
        return (EITHER if lax else VALID), [int(x) for x in r]
    return INVALID, None


def _prompt_rows(prompt: Any) -> tuple[str, list[list[int]] | None]:
    """The oracle: whether a prompt is valid, and the unpadded rows it stands for."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() not in (1, 2) or prompt.numel() == 0:
            return INVALID, None
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex:
            return INVALID, None
        rows = prompt.tolist() if prompt.dim() == 2 else [prompt.tolist()]
        if prompt.dtype == torch.bool:
            return EITHER, [[int(x) for x in r] for r in rows]
        if any(not 0 <= x < VOCAB for r in rows for x in r):
            return INVALID, None
        return VALID, rows
    if isinstance(prompt, str | bytes):
        kind, row = _row(prompt)
        return kind, None if row is None else [row]
    if not isinstance(prompt, list | tuple) or not prompt:
        return INVALID, None
    if not any(_is_row(x) for x in prompt):  # one row of ids
        kind, row = _row(prompt)
        return kind, None if row is None else [row]
    if not all(_is_row(x) for x in prompt):  # ids next to rows: ragged depth
        return INVALID, None
    judged = [_row(x) for x in prompt]
    if any(kind == INVALID for kind, _ in judged):
        return INVALID, None
    texts = {isinstance(x, str) for x in prompt}
    lax = isinstance(prompt, tuple) or len(texts) > 1 or any(kind == EITHER for kind, _ in judged)
    return (EITHER if lax else VALID), [row for _, row in judged]


def check_prompt(tiny: TinyModel, prompt: Any) -> None:
    """Any Python object as prompt: the greedy reference for valid ones, else a KvpressLikeError."""
    pipe = _full_pipe(tiny)
    kind, rows = _prompt_rows(prompt)
    key = f"{type(prompt).__name__}:{getattr(prompt, 'dtype', '')}:{prompt!r}"
    _note(f"prompt={prompt!r} judged {kind}, rows={rows}")
    out = _attempt(tiny, "prompts", key, lambda: pipe(prompt))
    if kind == INVALID:
        _must_refuse(out, "not a prompt: " + repr(prompt)[:200])
        return
    if kind == VALID:
        _must_succeed(out, f"a valid prompt, rows {rows}")
    if out.ok:
        _check_tokens(out.value.token_ids, len(rows), NEW_TOKENS, stop_on_eos=True)
        _check_stats(out.value.stats, rows)
        _check_greedy("prompts", tiny, out.value.token_ids, rows, NEW_TOKENS)


def test_fuzz_prompts(tiny):
    """Any Python object as prompt: the greedy reference for valid ones, else a KvpressLikeError."""

    @settings(max_examples=200, **FUZZ)
    @given(PROMPTS)
    def run(prompt):
        check_prompt(tiny, prompt)

    _fuzz(tiny, run)


# ================================================================ 3. generation settings

PIPE_DEFAULTS = dict(
    max_new_tokens=NEW_TOKENS, do_sample=False, seed=None, stop_on_eos=True, chat_template=None
)
JUNK = st.sampled_from(["", "abc", "💥"]) | st.builds(list) | st.builds(dict) | st.just([1])


NOTHING = st.nothing()


@dataclass(frozen=True)
class FieldValues:
    """Values of one generation field judged valid, either (lax or borderline) or invalid; junk of
    the wrong type is always invalid too."""

    valid: st.SearchStrategy
    invalid: st.SearchStrategy
    either: st.SearchStrategy = NOTHING


GEN_FIELDS: dict[str, FieldValues] = {
    "max_new_tokens": FieldValues(
        st.integers(1, 5) | st.none(),  # None: the pipeline's own setting
        st.sampled_from([0, -1, -(10**9), 2.5, *HUGE_NEW_TOKENS, *HUGE_NEW_TOKENS]),
    ),
    "do_sample": FieldValues(st.booleans() | st.none(), st.sampled_from([2, 0.5])),
    "temperature": FieldValues(
        st.floats(0.05, 5.0),
        st.sampled_from([0.0, -0.0, -1.0, -math.inf, math.nan]),
        st.sampled_from([1e-300, 5e-324, 1e-30, 1e-8, 1e300, math.inf]),
    ),
    "top_p": FieldValues(
        st.sampled_from([1.0, 0.95, 0.5]) | st.floats(0.01, 1.0),
        st.sampled_from([0.0, -0.5, 1.0000001, 2.0, math.inf, math.nan]),
        st.sampled_from([1e-300, 5e-324]),
    ),
    "seed": FieldValues(
        st.none() | st.integers(0, 2**31),
        st.sampled_from([1.5]),
        st.sampled_from([-1, -(2**63), 2**63, 2**64, 10**30]),
    ),
    "stop_on_eos": FieldValues(st.booleans(), st.sampled_from([None, 2, 0.5])),
    # "compiled" is valid but costs minutes of inductor on CPU: not drawn.
    "decode": FieldValues(
        st.sampled_from(["auto", "eager", "static"]), st.sampled_from(["EAGER", "fast", "compiled ", None, 1])
    ),
    "prefill": FieldValues(st.just("eager"), st.sampled_from(["Eager", "jit", None, 0])),
    "prefill_chunk": FieldValues(
        st.none() | st.integers(1, 16) | st.just(10**12), st.sampled_from([0, -1, -(10**9), 1.5])
    ),
    "chat_template": FieldValues(st.none() | st.just(False) | st.just(True), st.sampled_from([2, 0.5])),
}
UNKNOWN_KEYS = ["max_tokens", "temperatures", "foo", "", "window", "tsp_rate", "strategy"]


@st.composite
def generation_cases(draw):
    """A prompt (ids or text) and up to 4 generation keywords, each valid 6 times in 10, either
    2 (where the field has such values), invalid 2; sampling on in about half the cases."""
    keys = draw(st.lists(st.sampled_from(sorted(GEN_FIELDS)), max_size=4, unique=True))
    if "do_sample" not in keys and draw(st.booleans()):
        keys.append("do_sample")
    drawn = {}
    for key in keys:
        values, category = GEN_FIELDS[key], draw(st.integers(0, 9))
        if key == "do_sample" and category < 6:
            drawn[key] = (category < 4, VALID)  # sampling (True) more often than not
        elif category < 6 or (category < 8 and values.either is NOTHING):
            drawn[key] = (draw(values.valid), VALID)
        elif category < 8:
            drawn[key] = (draw(values.either), EITHER)
        else:
            drawn[key] = (draw(values.invalid | JUNK), INVALID)
    if draw(st.integers(0, 9)) == 0:
        drawn[draw(st.sampled_from(UNKNOWN_KEYS))] = (draw(ANY_VALUE), INVALID)
    prompt = draw(
        st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12) | st.text(min_size=1, max_size=10)
    )
    return prompt, drawn


def _gen_kind(prompt: Any, drawn: dict[str, tuple[Any, str]]) -> str:
    kinds = {kind for _, kind in drawn.values()}
    if drawn.get("chat_template", (None,))[0] is True:
        # CharTokenizer has no chat template: text cannot be wrapped in one; ids need none.
        kinds.add(INVALID if isinstance(prompt, str) else EITHER)
    return INVALID if INVALID in kinds else EITHER if EITHER in kinds else VALID


def check_generation(tiny: TinyModel, case: Any) -> None:
    """Any generation keywords on a call: the reference, or a KvpressLikeError (huge
    ``max_new_tokens`` quickly, without allocating for it)."""
    pipe = _full_pipe(tiny)
    prompt, drawn = case
    kwargs = {k: v for k, (v, _) in drawn.items()}
    kind = _gen_kind(prompt, drawn)
    _note(f"pipe({prompt!r}, **{kwargs!r}) judged {kind}")
    huge = _huge_new_tokens(kwargs.get("max_new_tokens"))
    limit = 2 * REFUSE_HUGE_S if huge else CALL_LIMIT_S
    out = _attempt(tiny, "generation", repr(case), lambda: pipe(prompt, **kwargs), limit=limit)
    if huge:
        _must_refuse(out, f"max_new_tokens={kwargs['max_new_tokens']}")
        assert out.seconds < REFUSE_HUGE_S, f"refused only after {out.seconds:.1f} s"
    if kind == INVALID:
        _must_refuse(out, f"invalid generation settings {kwargs!r}")
        return
    if kind == VALID:
        _must_succeed(out, f"valid generation settings {kwargs!r}")
    if not out.ok:
        return
    # None for a transformers field means "not given": the pipeline's own setting stays.
    eff = {**PIPE_DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None or k not in SAMPLING_FIELDS}}
    rows = [TOK(prompt)["input_ids"]] if isinstance(prompt, str) else [prompt]
    _check_tokens(out.value.token_ids, 1, eff["max_new_tokens"], eff["stop_on_eos"])
    _check_stats(out.value.stats, rows)
    if not eff["do_sample"]:
        _check_greedy(
            "generation", tiny, out.value.token_ids, rows, eff["max_new_tokens"], eff["stop_on_eos"]
        )
    elif eff["seed"] is not None:
        again = _attempt(tiny, "generation", repr(case) + ":again", lambda: pipe(prompt, **kwargs))
        _must_succeed(again, "the same call once more")
        assert again.value.token_ids == out.value.token_ids, "a seeded sampling call is reproducible"
        CHECKS["generation"]["seeded_sampling_reproduced"] += 1


def test_fuzz_generation_settings(tiny):
    """Any generation keywords on a call: the reference, or a KvpressLikeError (huge
    ``max_new_tokens`` quickly, without allocating for it)."""

    @settings(max_examples=150, **FUZZ)
    @given(generation_cases())
    def run(case):
        check_generation(tiny, case)

    _fuzz(tiny, run)


# ================================================================ 4. plugin outputs

HOOKS = ("score", "retain", "propagate")


def _valid_mask(width: int, lengths: list[int]) -> torch.Tensor:
    """[B, S] of the left-padded prompt: True on real tokens (independent of the library)."""
    return torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]


@dataclass
class _Shaped:
    """What an answer is shaped from: the layer the hook is asked about, and a seeded generator."""

    layer: Any
    gen: torch.Generator

    @property
    def dims(self) -> tuple[int, int, int]:
        b, hkv, s = self.layer.keys.shape[:3]
        return b, hkv, s

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen)

    def mask(self, *shape: int) -> torch.Tensor:
        return self.rand(*shape) < 0.5


def _shaped(fn: Callable[..., Any]) -> Callable[[_Shaped], Any]:
    return lambda x: fn(x, *x.dims)


# Answers any hook may give that are not tensors at all, or not shaped like any answer.
_COMMON_ANSWERS: dict[str, Callable[[_Shaped], Any]] = {
    "list": _shaped(lambda x, b, h, s: x.rand(b, h, s).tolist()),
    "int": lambda x: 1,
    "str": lambda x: "keep",
    "true": lambda x: True,
    "scalar_tensor": lambda x: torch.tensor(True),
    "scalar_float_tensor": lambda x: torch.tensor(0.5),
    "empty_tensor": lambda x: torch.empty(0),
}
_ANSWERS: dict[str, dict[str, Callable[[_Shaped], Any]]] = {
    "score": {  # float [B, Hkv, S]
        "float32": _shaped(lambda x, b, h, s: x.rand(b, h, s)),
        "float32_noncontiguous": _shaped(lambda x, b, h, s: x.rand(b, s, h).transpose(1, 2)),
        "float32_tied": _shaped(lambda x, b, h, s: torch.zeros(b, h, s)),
        "float32_huge_negative": _shaped(lambda x, b, h, s: -1e30 * x.rand(b, h, s)),
        "float64": _shaped(lambda x, b, h, s: x.rand(b, h, s).double()),
        "float16": _shaped(lambda x, b, h, s: x.rand(b, h, s).half()),
        "bfloat16": _shaped(lambda x, b, h, s: x.rand(b, h, s).bfloat16()),
        "some_inf": _shaped(lambda x, b, h, s: x.rand(b, h, s).masked_fill(x.mask(b, h, s), math.inf)),
        "all_neg_inf": _shaped(lambda x, b, h, s: torch.full((b, h, s), -math.inf)),
        "some_nan": _shaped(lambda x, b, h, s: x.rand(b, h, s).masked_fill(x.mask(b, h, s), math.nan)),
        "all_nan": _shaped(lambda x, b, h, s: torch.full((b, h, s), math.nan)),
        "int64": _shaped(lambda x, b, h, s: torch.randint(0, 9, (b, h, s), generator=x.gen)),
        "bool": _shaped(lambda x, b, h, s: x.mask(b, h, s)),
        "shape_B_S": _shaped(lambda x, b, h, s: x.rand(b, s)),
        "shape_B_1_S": _shaped(lambda x, b, h, s: x.rand(b, 1, s)),
        "shape_B_Hq_S": _shaped(lambda x, b, h, s: x.rand(b, Q_HEADS, s)),
        "shape_Hkv_B_S": _shaped(lambda x, b, h, s: x.rand(h, b, s)),
        "shape_S+1": _shaped(lambda x, b, h, s: x.rand(b, h, s + 1)),
        "shape_S-1": _shaped(lambda x, b, h, s: x.rand(b, h, s - 1)),
        "shape_4d": _shaped(lambda x, b, h, s: x.rand(b, h, s, 1)),
        "shape_flat": _shaped(lambda x, b, h, s: x.rand(b * h * s)),
    },
    "retain": {  # bool [B, Hkv, S]
        "bool": _shaped(lambda x, b, h, s: x.mask(b, h, s)),
        "bool_all": _shaped(lambda x, b, h, s: torch.ones(b, h, s, dtype=torch.bool)),
        "bool_none": _shaped(lambda x, b, h, s: torch.zeros(b, h, s, dtype=torch.bool)),
        "bool_padding_only": _shaped(lambda x, b, h, s: (~x.layer.valid)[:, None].expand(b, h, s).clone()),
        "bool_noncontiguous": _shaped(lambda x, b, h, s: x.mask(b, s, h).transpose(1, 2)),
        "bool_and_padding": _shaped(lambda x, b, h, s: x.mask(b, h, s) | ~x.layer.valid[:, None]),
        "float_mask": _shaped(lambda x, b, h, s: x.mask(b, h, s).float()),
        "uint8_mask": _shaped(lambda x, b, h, s: x.mask(b, h, s).to(torch.uint8)),
        "int64_indices": _shaped(lambda x, b, h, s: x.rand(b, h, s).topk(max(1, s // 2), dim=-1).indices),
        "shape_B_S": _shaped(lambda x, b, h, s: x.mask(b, s)),
        "shape_B_1_S": _shaped(lambda x, b, h, s: x.mask(b, 1, s)),
        "shape_S": _shaped(lambda x, b, h, s: x.mask(s)),
        "shape_Hkv_B_S": _shaped(lambda x, b, h, s: x.mask(h, b, s)),
        "shape_S+1": _shaped(lambda x, b, h, s: x.mask(b, h, s + 1)),
        "shape_S-1": _shaped(lambda x, b, h, s: x.mask(b, h, s - 1)),
    },
    "propagate": {  # bool [B, S]
        "bool": _shaped(lambda x, b, h, s: x.mask(b, s)),
        "bool_all": _shaped(lambda x, b, h, s: torch.ones(b, s, dtype=torch.bool)),
        "bool_none": _shaped(lambda x, b, h, s: torch.zeros(b, s, dtype=torch.bool)),
        "bool_padding_only": _shaped(lambda x, b, h, s: (~x.layer.valid).clone()),
        "bool_noncontiguous": _shaped(lambda x, b, h, s: x.mask(s, b).t()),
        "float_mask": _shaped(lambda x, b, h, s: x.mask(b, s).float()),
        "uint8_mask": _shaped(lambda x, b, h, s: x.mask(b, s).to(torch.uint8)),
        "int64_indices": _shaped(lambda x, b, h, s: x.rand(b, s).topk(max(1, s // 2), dim=-1).indices),
        "shape_B_Hkv_S": _shaped(lambda x, b, h, s: x.mask(b, h, s)),
        "shape_S": _shaped(lambda x, b, h, s: x.mask(s)),
        "shape_S_B": _shaped(lambda x, b, h, s: x.mask(s, b)),
        "shape_S+1": _shaped(lambda x, b, h, s: x.mask(b, s + 1)),
        "shape_S-1": _shaped(lambda x, b, h, s: x.mask(b, s - 1)),
    },
}
for _answers in _ANSWERS.values():
    _answers.update(_COMMON_ANSWERS)

WINDOW = TINY_FASTKV["window"]


def _judge(hook: str, answer: Any, layer: Any) -> str:
    """The oracle for one answer, from the hook's contract (``hookspecs.py``) and the issue:
    the right type, dtype and shape; no NaN or infinite score at a real token; a mask keeping no
    real entry of a (row, KV head), or propagating no real token of a row, is broken. Masks
    keeping fewer than ``min(window, real tokens)`` may be refused (the strategy's window is
    always kept), other float dtypes than the model's may be refused; nothing else may."""
    b, hkv, s = layer.keys.shape[:3]
    shape = (b, s) if hook == "propagate" else (b, hkv, s)
    # [Hkv, B, S] is [B, Hkv, S] when B == Hkv: nobody can tell, so it is judged as such.
    if not isinstance(answer, torch.Tensor) or tuple(answer.shape) != shape:
        return INVALID
    valid = layer.valid  # [B, S]
    if hook == "score":
        if not answer.is_floating_point():
            return INVALID
        if not (torch.isfinite(answer) | ~valid[:, None]).all():
            return INVALID
        return VALID if answer.dtype == torch.float32 else EITHER
    if answer.dtype != torch.bool:
        return INVALID
    least = valid.sum(dim=-1).clamp(max=WINDOW)  # [B]
    if hook == "retain":
        kept, least = (answer & valid[:, None]).sum(dim=-1), least[:, None]  # [B, Hkv]
    else:
        kept = (answer & valid).sum(dim=-1)  # [B]
    if ((kept == 0) & (least > 0)).any():
        return INVALID
    return VALID if (kept >= least).all() else EITHER


def _throw(exc: BaseException) -> None:
    raise exc


RAISES: dict[str, Callable[[], None]] = {
    "raise_zero_division": lambda: 1 / 0,
    "raise_key_error": lambda: {}["missing"],
    "raise_runtime_error": lambda: _throw(RuntimeError("injected failure")),
}


@dataclass
class Behaviour:
    kind: str  # a key of _ANSWERS[hook] or of RAISES, or "defer" (answer None)
    layer: int | None  # the layer it answers at (None: every layer); elsewhere it defers
    seed: int

    def active(self, layer_idx: int) -> bool:
        return self.kind != "defer" and (self.layer is None or self.layer == layer_idx)


@dataclass
class FuzzPlugin:
    """Answers ``score`` / ``retain`` / ``propagate`` ahead of the strategy with drawn outputs."""

    behaviours: dict[str, Behaviour]
    answers: list[tuple[int, str, str]] = field(default_factory=list)  # (layer, hook, judged), in order
    retained: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> retain mask given
    raised: list[BaseException] = field(default_factory=list)

    def _answer(self, hook: str, layer: Any) -> Any:
        b = self.behaviours[hook]
        if not b.active(layer.layer_idx):
            return None
        if b.kind in RAISES:
            self.answers.append((layer.layer_idx, hook, "raises"))
            try:
                RAISES[b.kind]()
            except Exception as exc:
                self.raised.append(exc)
                raise
        gen = torch.Generator().manual_seed(b.seed + layer.layer_idx)
        out = _ANSWERS[hook][b.kind](_Shaped(layer, gen))
        judged = _judge(hook, out, layer)
        self.answers.append((layer.layer_idx, hook, judged))
        if hook == "retain" and judged != INVALID:
            self.retained[layer.layer_idx] = out.clone()
        return out

    def expected(self) -> tuple[set[str], bool]:
        """Hooks a PluginError may name (any whose answer was not valid: answers may be checked
        later, together), and whether one must be raised (a broken answer or a raise was given)."""
        allowed = {hook for _, hook, judged in self.answers if judged != VALID}
        broken = any(judged in (INVALID, "raises") for _, _, judged in self.answers)
        return allowed, broken

    @hookimpl(tryfirst=True)
    def score(self, layer):
        return self._answer("score", layer)

    @hookimpl(tryfirst=True)
    def retain(self, layer, scores):
        return self._answer("retain", layer)

    @hookimpl(tryfirst=True)
    def propagate(self, layer, scores):
        return self._answer("propagate", layer)


WELL_FORMED = {
    "score": ["float32", "float32_noncontiguous", "float32_tied", "float32_huge_negative"],
    "retain": ["bool", "bool_all", "bool_noncontiguous", "bool_and_padding"],
    "propagate": ["bool", "bool_all", "bool_noncontiguous"],
}


@st.composite
def plugin_cases(draw):
    """Per hook: defer, a well-formed answer, a raise, or any answer of ``_ANSWERS`` (uniform
    draws of the category, so that about one case in five has no broken answer at all)."""
    behaviours = {}
    for hook in HOOKS:
        category = draw(st.integers(0, 9))
        if category < 3:
            kind = "defer"
        elif category < 6:
            kind = draw(st.sampled_from(WELL_FORMED[hook]))
        elif category < 7:
            kind = draw(st.sampled_from(sorted(RAISES)))
        else:
            kind = draw(st.sampled_from(sorted(_ANSWERS[hook])))
        at = draw(st.sampled_from([None, None, *range(NUM_LAYERS)]))
        behaviours[hook] = Behaviour(kind, at, draw(st.integers(0, 2**16)))
    lengths = draw(st.lists(st.integers(20, 40), min_size=1, max_size=3))  # B == Hkv (2) included
    seed = draw(st.integers(0, 2**16))
    return behaviours, lengths, seed


def refusable_answers(plugin: FuzzPlugin) -> set[str]:
    """Hooks that gave an answer (not a raise) judged invalid or either."""
    return {hook for _, hook, judged in plugin.answers if judged in (INVALID, EITHER)}


def check_plugin(tiny: TinyModel, case: Any) -> None:
    """Answers of a plugin stacked on fastkv: valid ones work (and ``retain`` keeps what its mask
    says), broken ones raise a PluginError that names the hook (chained to what it raised)."""
    behaviours, lengths, seed = case
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    plugin = FuzzPlugin(behaviours)
    _note(f"behaviours={behaviours}, lengths={lengths}")
    key = repr((sorted((h, b.kind, b.layer, b.seed) for h, b in behaviours.items()), lengths, seed))

    def build_and_call():
        return pipeline(tiny.model, "fastkv", plugins=[plugin], max_new_tokens=2, **TINY_FASTKV)(rows)

    out = _attempt(tiny, "plugins", key, build_and_call)
    allowed, must_fail = plugin.expected()
    _note(f"answers (layer, hook, judged): {plugin.answers}")
    if must_fail:
        _must_refuse(out, f"a broken answer or a raise from one of {sorted(allowed)}")
    elif not allowed:
        _must_succeed(out, "every answer keeps the hooks' contract")
    if not out.ok:
        assert isinstance(out.error, PluginError), f"a broken plugin gives a PluginError: {out.error!r}"
        named = {hook for hook in HOOKS if re.search(rf"\b{hook}\b", str(out.error))}
        assert named & allowed, f"the PluginError names one of {sorted(allowed)}: {out.error}"
        raising = {hook for _, hook, judged in plugin.answers if judged == "raises"}
        if plugin.raised and (raising & named or not named <= refusable_answers(plugin)):
            # About the raise: chained to it. (An earlier answer not valid may be reported instead,
            # as the cause: a raise can follow from it; that error then names only such answers.)
            assert out.error.__cause__ is plugin.raised[0], (
                f"a PluginError about a raise is chained to what the plugin raised "
                f"({plugin.raised[:1]!r}); __cause__ is {out.error.__cause__!r}"
            )
        return
    assert not plugin.raised, f"the plugin raised {plugin.raised[0]!r}, yet the call succeeded"
    _check_tokens(out.value.token_ids, len(rows), 2, stop_on_eos=True)
    _check_stats(out.value.stats, rows)
    # Layers before any propagation see the whole padded prompt: the retained count is the
    # mask's True entries among real tokens, averaged over KV heads.
    width = max(lengths)
    valid = _valid_mask(width, lengths)
    propagate = behaviours["propagate"]
    first_propagation = min(
        [TINY_FASTKV["tsp_layer"]] + [i for i in range(NUM_LAYERS) if propagate.active(i)]
    )
    for layer_idx, keep in plugin.retained.items():
        if layer_idx > first_propagation or keep.shape != (len(rows), KV_HEADS, width):
            continue
        expected = (keep & valid[:, None]).sum(dim=-1).float().mean(dim=-1).tolist()
        got = out.value.stats.kv_kept_per_layer[layer_idx]
        CHECKS["plugins"]["kv_kept_vs_retain_mask"] += 1
        assert got == pytest.approx(expected), (
            f"layer {layer_idx}: kv_kept_per_layer {got}, the retain mask keeps {expected}"
        )


def test_fuzz_plugin_outputs(tiny):
    """Answers of a plugin stacked on fastkv: valid ones work (and ``retain`` keeps what its mask
    says), broken ones raise a PluginError that names the hook (chained to what it raised)."""

    @settings(max_examples=250, **FUZZ)
    @given(plugin_cases())
    def run(case):
        check_plugin(tiny, case)

    _fuzz(tiny, run)


# ================================================================ 6. named edge cases
# The cases the issue names, run through the same checks one by one (one test id each), so that
# each is tried whatever the fuzzer draws, and a failing one does not stop the fuzzing above.

EDGE_ROWS = [torch.randint(3, VOCAB, (90,), generator=torch.Generator().manual_seed(2)).tolist()]
CONFIG_EDGES = {
    "huge-new-tokens-static": ("full", {"max_new_tokens": 10**9, "decode": "static"}, EDGE_ROWS),
    "huge-new-tokens-eager": ("fastkv", {"max_new_tokens": 10**7, "decode": "eager"}, EDGE_ROWS),
    "new-tokens-2**63": ("full", {"max_new_tokens": 2**63}, EDGE_ROWS),
    "tsp-layer-huge": ("fastkv", {"tsp_layer": 10**30, "max_new_tokens": 2}, EDGE_ROWS),
    "window-2**63": ("fastkv", {"window": 2**63, "max_new_tokens": 2}, EDGE_ROWS),
    "retain-rate-nan": ("snapkv", {"retain_rate": math.nan, "max_new_tokens": 2}, EDGE_ROWS),
    "kernel-huge": ("snapkv", {"kernel": 10**9 + 1, "max_new_tokens": 2}, EDGE_ROWS),
    "chunk-size-huge": ("h2o", {"chunk_size": 10**9, "max_new_tokens": 2}, EDGE_ROWS),
    "sink-tokens-huge": ("streamingllm", {"sink_tokens": 10**9, "max_new_tokens": 2}, EDGE_ROWS),
    "beta-inf": ("pyramidkv", {"beta": math.inf, "max_new_tokens": 2}, EDGE_ROWS),
    "floor-nan": ("adakv", {"floor": math.nan, "max_new_tokens": 2}, EDGE_ROWS),
    "filter-layer-negative": ("gemfilter", {"filter_layer": -1, "max_new_tokens": 2}, EDGE_ROWS),
    "constant-budgets-huge": (
        "fastkv",
        {"budget_mode": "constant", "retain_tokens": 10**9, "tsp_tokens": 10**9, "max_new_tokens": 2},
        EDGE_ROWS,
    ),
    "full-prefill-chunk-1": ("full", {"prefill_chunk": 1, "max_new_tokens": 3}, EDGE_ROWS),
    "full-static-decode": ("full", {"decode": "static", "max_new_tokens": 3}, EDGE_ROWS),
    "unknown-name": ("FastKV", {"max_new_tokens": 2}, EDGE_ROWS),
    "name-not-a-string": (["fastkv"], {"max_new_tokens": 2}, EDGE_ROWS),
}
PROMPT_EDGES = {
    "none-in-ids": [5, None],
    "none-in-tuple": (0, None),
    "tensor-0x0": torch.zeros(0, 0, dtype=torch.long),
    "tensor-0x3": torch.zeros(0, 3, dtype=torch.long),
    "tensor-3d": torch.ones(2, 3, 4, dtype=torch.long),
    "tensor-0d": torch.tensor(5),
    "tensor-float": torch.tensor([1.0, 2.0]),
    "tensor-bool": torch.tensor([True, False]),
    "tensor-uint8": torch.tensor([[5, 255]], dtype=torch.uint8),
    "tensor-int32-negative": torch.tensor([5, -1], dtype=torch.int32),
    "tensor-int64-huge": torch.tensor([5, 2**62]),
    "ragged-batch": [[5, 6, 7], [8]],
    "id-2**64": [2**64],
    "id-negative": [-1],
    "id-vocab": [VOCAB],
    "floats": [1.5, 2.0],
    "bools": [True, False],
    "empty-string": "",
    "empty-string-row": ["ab", ""],
    "empty-row": [[5], []],
    "text-and-ids": ["ab", [3, 4]],
    "bytes": b"ab",
    "depth-3": [[[1]]],
    "ragged-depth": [[1, [2]]],
    "dict": {"input_ids": [5]},
    "none": None,
}
GENERATION_EDGES = {
    "chat-template-without-one": ("hello", {"chat_template": (True, INVALID)}),
    "temperature-1e-300": ("hello", {"do_sample": (True, VALID), "temperature": (1e-300, EITHER)}),
    "temperature-denormal-top-p-denormal": (
        [5, 6, 7],
        {"do_sample": (True, VALID), "temperature": (5e-324, EITHER), "top_p": (5e-324, EITHER)},
    ),
    "temperature-inf": ([5, 6, 7], {"do_sample": (True, VALID), "temperature": (math.inf, EITHER)}),
    "seed-2**64": ([5, 6, 7], {"do_sample": (True, VALID), "seed": (2**64, EITHER)}),
    "seed-negative": ([5, 6, 7], {"do_sample": (True, VALID), "seed": (-(2**63), EITHER)}),
    "new-tokens-10**9-static": ([5, 6, 7], {"max_new_tokens": (10**9, INVALID), "decode": ("static", VALID)}),
    "new-tokens-10**7": ([5, 6, 7], {"max_new_tokens": (10**7, INVALID)}),
    "new-tokens-0": ([5, 6, 7], {"max_new_tokens": (0, INVALID)}),
    "new-tokens-negative": ([5, 6, 7], {"max_new_tokens": (-1, INVALID)}),
    "prefill-chunk-1": ([5, 6, 7, 8, 9], {"prefill_chunk": (1, VALID)}),
    "no-stop-on-eos": ([5, 6, 7], {"stop_on_eos": (False, VALID), "max_new_tokens": (5, VALID)}),
    "top-p-nan": ([5, 6, 7], {"do_sample": (True, VALID), "top_p": (math.nan, INVALID)}),
}


def _plugin_edge(lengths: list[int], **kinds: str) -> tuple[dict[str, Behaviour], list[int], int]:
    behaviours = {hook: Behaviour(kinds.get(hook, "defer"), None, 1) for hook in HOOKS}
    return behaviours, lengths, 0


PLUGIN_EDGES = {
    "retain-B-S-when-B-is-Hkv": _plugin_edge([40, 40], retain="shape_B_S"),
    "retain-B-S-batch-1": _plugin_edge([40], retain="shape_B_S"),
    "retain-B-1-S": _plugin_edge([40, 33, 25], retain="shape_B_1_S"),
    "retain-float-mask": _plugin_edge([40], retain="float_mask"),
    "retain-int64-indices": _plugin_edge([40], retain="int64_indices"),
    "retain-keeps-nothing": _plugin_edge([40], retain="bool_none"),
    "retain-keeps-padding-too": _plugin_edge([40, 30], retain="bool_and_padding"),
    "retain-list": _plugin_edge([40], retain="list"),
    "score-B-S": _plugin_edge([40, 40], score="shape_B_S"),
    "score-bool": _plugin_edge([40], score="bool"),
    "score-nan": _plugin_edge([40], score="some_nan"),
    "score-inf": _plugin_edge([40], score="some_inf"),
    "score-string": _plugin_edge([40], score="str"),
    "propagate-B-Hkv-S": _plugin_edge([40, 40], propagate="shape_B_Hkv_S"),
    "propagate-nothing": _plugin_edge([40], propagate="bool_none"),
    "propagate-int": _plugin_edge([40], propagate="int"),
    "propagate-indices": _plugin_edge([40], propagate="int64_indices"),
    "score-raises": _plugin_edge([40], score="raise_zero_division"),
    "retain-raises": _plugin_edge([40], retain="raise_key_error"),
    "propagate-raises": _plugin_edge([40], propagate="raise_runtime_error"),
    # Two faults: the NaN scores may be reported (as the cause) instead of the raise.
    "nan-score-then-propagate-raises": _plugin_edge([20], score="all_nan", propagate="raise_key_error"),
    "valid-score-then-retain-raises": _plugin_edge([40], score="float32", retain="raise_zero_division"),
    "all-valid": _plugin_edge([40, 30, 20], score="float32", retain="bool", propagate="bool_all"),
}


EDGES = {
    "config": (check_config, CONFIG_EDGES),
    "prompt": (check_prompt, PROMPT_EDGES),
    "generation": (check_generation, GENERATION_EDGES),
    "plugin": (check_plugin, PLUGIN_EDGES),
}


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind, (_, cases) in EDGES.items() for name in sorted(cases)]
)
def test_edge_cases(tiny, kind, name):
    check, cases = EDGES[kind]
    check(tiny, cases[name])
    message = tiny.generate_changes()
    assert message is None, message
