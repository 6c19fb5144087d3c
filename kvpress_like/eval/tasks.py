"""Accuracy tasks, generated offline and deterministically from a seed.

Every generator takes ``(tokenizer, target_tokens, depth, seed, index, haystack)`` and returns a
:class:`Sample`: the prompt text, the expected answer(s) and metadata (depth, token length, needle
offsets). The tokenizer is anything called like a Hugging Face one (``tok(text)["input_ids"]``); the whole
prompt (instruction, context, question) is built to ``target_tokens`` with it, within
``length_tolerance(target_tokens)`` tokens (passkey: within one filler sentence, as
``kvpress_like.eval.passkey`` builds it).

Tasks (RULER style, Hsieh et al. 2024, where they have a RULER counterpart):

``passkey``          the classic passkey in repetitive filler (``kvpress_like.eval.passkey``)
``niah_single``      one needle ("One of the special magic numbers for KEY is: VALUE.") in the
                     haystack (``haystacks.py``: essays by default, or Python source)
``niah_multikey``    several needles with different keys; one key is asked
``niah_multivalue``  one key with several values; all values are asked
``niah_multiquery``  several needles; several keys are asked
``vt``               variable tracking: a chain ``VAR A = 12345. VAR B = VAR A. ...`` in the haystack
``fidelity``         haystack text only (no label): the harness compares the compressed cache's
                     next-token distributions with the full cache's over teacher-forced steps

Depth is the share of the context (the haystack, needles excluded) that comes before the needle
that is asked about; the needle goes at the boundary nearest to it (a sentence's end in prose, a
line's in code).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kvpress_like.eval import haystacks
from kvpress_like.eval.haystacks import DEFAULT_HAYSTACK
from kvpress_like.eval.passkey import _template, found_key, passkey_prompt

NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
NEEDLE_TASKS = ("passkey", *NIAH_TASKS)  # tasks with a depth worth a heatmap
TASKS = ("passkey", *NIAH_TASKS, "vt", "fidelity")

# Tokens to generate per task (numbers are one token per digit in many tokenizers).
MAX_NEW_TOKENS = {
    "passkey": 12,
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 40,
    "fidelity": 16,  # decode steps compared
}

_ADJECTIVES = [
    "lovely",
    "quiet",
    "brave",
    "silent",
    "amber",
    "rapid",
    "gentle",
    "hollow",
    "bitter",
    "golden",
    "crisp",
    "humble",
    "frozen",
    "lively",
    "odd",
    "proud",
    "rustic",
    "shiny",
    "tidy",
    "wild",
]
_NOUNS = [
    "cabbage",
    "harbor",
    "violin",
    "meadow",
    "lantern",
    "pebble",
    "falcon",
    "orchard",
    "compass",
    "saddle",
    "thimble",
    "glacier",
    "ribbon",
    "kettle",
    "walrus",
    "canyon",
    "marble",
    "tulip",
    "anchor",
    "biscuit",
]

_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."


@dataclass(frozen=True)
class Sample:
    task: str
    index: int  # sample number within (task, length, seed)
    prompt: str
    answers: tuple[str, ...]  # every one is expected in the output (empty for fidelity)
    target_tokens: int
    depth: float
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)  # prompt_tokens, needle offsets, ...
    haystack: str = DEFAULT_HAYSTACK  # the text the needles hide in (``haystacks.py``)


def length_tolerance(target_tokens: int) -> int:
    """How far a generated prompt may be from its target length, in tokens."""
    return max(4, round(0.01 * target_tokens))


# ---- prompt building --------------------------------------------------------------------------


def _prompt_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _fit(tokenizer, target_tokens: int, build: Callable[[int], tuple[str, dict]]) -> tuple[str, dict]:
    """Call ``build(context_tokens)`` with the context budget that brings the prompt to the target."""
    fixed_text, _ = build(0)
    fixed = _prompt_tokens(tokenizer, fixed_text)
    if fixed > target_tokens:
        raise ValueError(
            f"target_tokens: must leave room for the instruction, needles and question, "
            f"{fixed} tokens (got {target_tokens})"
        )
    budget = target_tokens - fixed
    best = None
    for _ in range(6):
        prompt, meta = build(budget)
        n = _prompt_tokens(tokenizer, prompt)
        if best is None or abs(n - target_tokens) < abs(best[2] - target_tokens):
            best = (prompt, meta, n)
        if abs(n - target_tokens) <= length_tolerance(target_tokens) // 2 or n == target_tokens:
            break
        budget = max(0, budget + target_tokens - n)
    prompt, meta, n = best
    return prompt, {**meta, "prompt_tokens": n}


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], n)
    return pairs


def _values(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if v not in out:
            out.append(v)
    return out


def _context_depths(prompt: str, context_start: int, context: str, needles: list[str]) -> list[float]:
    """Depth of each needle: the share of the context's own text (needles excluded) before it."""
    depths = []
    body = prompt[context_start:]
    for needle in needles:
        pos = body.index(needle)
        before = body[:pos]
        for other in needles:
            before = before.replace(other, "")
        depths.append(len(re.sub(r"\s+", "", before)) / max(1, len(re.sub(r"\s+", "", context))))
    return depths


# ---- generators -------------------------------------------------------------------------------


def _template_filler() -> str:
    return _template()["filler"]


def make_passkey(
    tokenizer, target_tokens: int, depth: float, seed: int, index: int = 0, haystack: str = DEFAULT_HAYSTACK
) -> Sample:
    """The classic passkey in its own repetitive filler (``haystack`` only labels the sample)."""
    p = passkey_prompt(tokenizer, target_tokens, depth, seed)
    return Sample(
        "passkey",
        index,
        p.text,
        (p.key,),
        target_tokens,
        depth,
        seed,
        {"prompt_tokens": _prompt_tokens(tokenizer, p.text), "needle_offsets": [p.text.index(p.key)]},
        haystack,  # the run's, so its records carry it (the filler is the same)
    )


def _niah(
    task: str,
    tokenizer,
    target_tokens: int,
    depth: float,
    seed: int,
    index: int = 0,
    haystack: str = DEFAULT_HAYSTACK,
    *,
    n_keys: int,
    n_values: int,
    n_queries: int,
) -> Sample:
    kind = haystacks.haystack_named(haystack)
    rng = random.Random(f"{task}:{seed}")
    keys = _keys(rng, n_keys)
    values = {k: _values(rng, n_values) for k in keys}
    queries = keys[:n_queries]
    # The first needle of the first asked key goes at ``depth``; the others at seeded depths.
    needles, items = [], []
    for k in keys:
        for v in values[k]:
            needle = _NEEDLE.format(key=k, value=v)
            d = depth if not items else rng.random()
            needles.append(needle)
            items.append((d, needle))
    ctx_rng_seed = rng.random()
    query = ", ".join(queries[:-1]) + (" and " if len(queries) > 1 else "") + queries[-1]
    if n_values > 1 or n_queries > 1:
        question = (
            f"What are all the special magic numbers for {query} mentioned in the provided text? "
            f"The special magic numbers for {query} mentioned in the provided text are"
        )
    else:
        question = (
            f"What is the special magic number for {query} mentioned in the provided text? "
            f"The special magic number for {query} mentioned in the provided text is"
        )
    head = _NIAH_INTRO + kind.joiner

    def build(budget: int) -> tuple[str, dict]:
        context = haystacks.haystack(tokenizer, budget, random.Random(ctx_rng_seed), kind) if budget else ""
        body = haystacks.insert(context, items, kind)
        prompt = f"{head}{body}{kind.joiner}{question}"
        return prompt, {"context": context}

    prompt, meta = _fit(tokenizer, target_tokens, build)
    context = meta.pop("context")
    answers = tuple(v for k in queries for v in values[k])
    offsets = [prompt.index(n) for n in needles]
    meta |= {
        "keys": keys,
        "queries": queries,
        "needle_offsets": offsets,
        "context_span": [len(head), len(prompt) - len(question) - 1],
        "needle_depths": _context_depths(prompt, len(head), context, needles),
    }
    return Sample(task, index, prompt, answers, target_tokens, depth, seed, meta, haystack)


# RULER's four needle tasks: (keys, values per key, keys asked)
make_niah_single = partial(_niah, "niah_single", n_keys=1, n_values=1, n_queries=1)
make_niah_multikey = partial(_niah, "niah_multikey", n_keys=4, n_values=1, n_queries=1)
make_niah_multivalue = partial(_niah, "niah_multivalue", n_keys=1, n_values=4, n_queries=1)
make_niah_multiquery = partial(_niah, "niah_multiquery", n_keys=4, n_values=1, n_queries=4)


def make_vt(
    tokenizer,
    target_tokens: int,
    depth: float,
    seed: int,
    index: int = 0,
    haystack: str = DEFAULT_HAYSTACK,
    hops: int = 4,
) -> Sample:
    """One chain of ``hops + 1`` variables; its first assignment at ``depth``, the rest after it."""
    kind = haystacks.haystack_named(haystack)
    rng = random.Random(f"vt:{seed}")
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    later = sorted(depth + (1 - depth) * rng.random() for _ in statements[1:])
    items = list(zip([depth, *later], statements, strict=True))
    ctx_rng_seed = rng.random()
    head = _VT_INTRO + kind.joiner
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
        f"variables are assigned the value {value}, they are:"
    )

    def build(budget: int) -> tuple[str, dict]:
        context = haystacks.haystack(tokenizer, budget, random.Random(ctx_rng_seed), kind) if budget else ""
        return f"{head}{haystacks.insert(context, items, kind)}{kind.joiner}{question}", {"context": context}

    prompt, meta = _fit(tokenizer, target_tokens, build)
    context = meta.pop("context")
    meta |= {
        "value": value,
        "needle_offsets": [prompt.index(s) for s in statements],
        "context_span": [len(head), len(prompt) - len(question) - 1],
        "needle_depths": _context_depths(prompt, len(head), context, statements),
    }
    return Sample("vt", index, prompt, tuple(names), target_tokens, depth, seed, meta, haystack)


def make_fidelity(
    tokenizer, target_tokens: int, depth: float, seed: int, index: int = 0, haystack: str = DEFAULT_HAYSTACK
) -> Sample:
    """Haystack text of the target length; no answer (the full cache is the reference)."""
    kind = haystacks.haystack_named(haystack)

    def build(budget: int) -> tuple[str, dict]:
        return haystacks.haystack(tokenizer, budget, random.Random(f"fidelity:{seed}"), kind), {}

    prompt, meta = _fit(tokenizer, target_tokens, build)
    return Sample("fidelity", index, prompt, (), target_tokens, depth, seed, meta, haystack)


GENERATORS: dict[str, Callable[..., Sample]] = {
    "passkey": make_passkey,
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "niah_multiquery": make_niah_multiquery,
    "vt": make_vt,
    "fidelity": make_fidelity,
}


def sample_depth(index: int, samples: int) -> float:
    """Depths spread evenly over [0, 1] across a task's samples (0.5 for a single sample)."""
    return 0.5 if samples == 1 else index / (samples - 1)


def sample_seed(seed: int, task: str, target_tokens: int, index: int) -> int:
    """A per-sample seed derived from the run's seed (string seeding is stable across runs)."""
    return random.Random(f"{seed}:{task}:{target_tokens}:{index}").randrange(2**31)


def make_samples(
    tokenizer, task: str, target_tokens: int, samples: int, seed: int, haystack: str = DEFAULT_HAYSTACK
) -> list[Sample]:
    if task not in GENERATORS:
        raise ValueError(f"task: must be one of {', '.join(TASKS)} (got {task!r})")
    return [
        GENERATORS[task](
            tokenizer,
            target_tokens,
            sample_depth(i, samples),
            sample_seed(seed, task, target_tokens, i),
            index=i,
            haystack=haystack,
        )
        for i in range(samples)
    ]


# ---- scoring ----------------------------------------------------------------------------------


def contains(prediction: str, answer: str) -> bool:
    """``answer`` appears in ``prediction`` as a whole token (a number not inside a longer one)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", prediction) is not None


def recall(prediction: str, answers: tuple[str, ...]) -> float:
    """Share of the expected answers found in the prediction (RULER's ``string_match_all``)."""
    if not answers:
        return 0.0
    return sum(contains(prediction, a) for a in answers) / len(answers)


def score(sample: Sample, prediction: str) -> float:
    """Accuracy in [0, 1]: passkey: the first 5-digit number is the key; the rest: recall of the
    expected answers (so 0/1 for single-answer tasks, partial for multi-value, multi-query, vt)."""
    if sample.task == "passkey":
        return float(found_key(prediction, sample.answers[0]))
    if sample.task == "fidelity":
        raise ValueError("fidelity: scored by the harness against the full cache, not from text")
    return recall(prediction, sample.answers)
