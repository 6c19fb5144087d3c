"""The texts needles hide in: shipped with the package, cut to a token count, needles inserted.

``essays``  Paul Graham's essays (``data/haystack``), whitespace collapsed: natural prose.
``code``    Python source from CPython's standard library (``data/code``, PSF licence in
            ``data/code/LICENSE``), lines and indentation kept: a text of another kind, where
            needles go on lines of their own.

The files are a snapshot in the package, not read from the running Python, so that two machines
build the same prompts from the same seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files


@dataclass(frozen=True)
class Haystack:
    name: str
    folder: str  # under kvpress_like/eval
    suffix: str  # of its files
    joiner: str  # between documents, and around an inserted sentence
    boundaries: tuple[str, ...]  # regexes of where a sentence may go, tried in order
    collapse_whitespace: bool

    @property
    def texts(self) -> tuple[str, ...]:
        return _texts(self)


HAYSTACKS = {
    "essays": Haystack("essays", "data/haystack", ".txt", " ", (r"[.!?] ", r" "), True),
    "code": Haystack("code", "data/code", ".py.txt", "\n", (r"\n",), False),
}
DEFAULT_HAYSTACK = "essays"


def haystack_named(name: str) -> Haystack:
    if name not in HAYSTACKS:
        raise ValueError(f"haystack: must be one of {', '.join(HAYSTACKS)} (got {name!r})")
    return HAYSTACKS[name]


@cache
def _texts(kind: Haystack) -> tuple[str, ...]:
    """The kind's documents in name order (prose: whitespace collapsed; code: as written)."""
    folder = files("kvpress_like.eval").joinpath(kind.folder)
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(kind.suffix))
    out = []
    for name in names:
        text = folder.joinpath(name).read_text(encoding="utf-8", errors="replace")
        out.append(re.sub(r"\s+", " ", text).strip() if kind.collapse_whitespace else text.strip("\n"))
    return tuple(out)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_ends(tokenizer, text: str) -> list[int] | None:
    """Where each token of ``text`` ends (a fast tokenizer's offsets), else None."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [end for _, end in offsets]


def _longest_prefix(tokenizer, text: str, n_tokens: int, ends: list[int] | None) -> int:
    """Length of a long prefix of ``text`` with at most ``n_tokens`` tokens: where token
    ``n_tokens`` ends (``ends``, checked: a prefix can tokenize differently), else the longest by a
    binary search over prefixes."""
    if ends is not None:
        for end in reversed(ends[:n_tokens]):
            if _n_tokens(tokenizer, text[:end]) <= n_tokens:
                return end
        return 0
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _n_tokens(tokenizer, text[:mid]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def haystack(tokenizer, n_tokens: int, rng: random.Random, kind: Haystack) -> str:
    """At most ``n_tokens`` tokens of ``kind``'s documents, starting at one chosen by ``rng``,
    cut after a word when one ends just before the end."""
    docs = kind.texts
    start = rng.randrange(len(docs))
    if n_tokens <= 0:
        return ""
    text, i = "", start
    while True:  # enough characters that a prefix of them has n_tokens tokens
        text = f"{text}{kind.joiner}{docs[i % len(docs)]}" if text else docs[i % len(docs)]
        i += 1
        if len(text) >= 5 * n_tokens:  # tokenizing is the slow part: not before it may suffice
            ends = _token_ends(tokenizer, text)
            if (len(ends) if ends is not None else _n_tokens(tokenizer, text)) > n_tokens:
                break
        if i - start > 10 * len(docs):  # tokenizer with huge tokens: take all we have
            return text
    cut = text[: _longest_prefix(tokenizer, text, n_tokens, ends)]
    # After a word when that loses a few characters (a line's end, or a long word's start, would
    # lose too many for the prompt to land within its length tolerance).
    end = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:end] if len(cut) - end <= min(12, 0.1 * len(cut)) else cut


def boundary(text: str, depth: float, kind: Haystack) -> int:
    """Character index of the boundary nearest to ``depth`` of ``text`` (the kind's first
    boundary pattern that has one near it)."""
    target = round(depth * len(text))
    if target <= 0 or target >= len(text):
        return max(0, min(target, len(text)))
    reach = max(8, round(0.02 * len(text)))
    offset = max(0, target - reach)
    window = text[offset : target + reach]
    for pattern in kind.boundaries:
        candidates = [m.end() + offset for m in re.finditer(pattern, window)]
        if candidates:
            return min(candidates, key=lambda c: abs(c - target))
    return target


def insert(context: str, items: list[tuple[float, str]], kind: Haystack) -> str:
    """Insert sentences at depths of the original ``context``, each at a boundary (code: on a line
    of its own)."""
    placed = sorted(((boundary(context, d, kind), s) for d, s in items), key=lambda x: x[0], reverse=True)
    for pos, sentence in placed:
        # Boundaries end with the joiner, so the text around the sentence stays as it was (code
        # keeps its blank lines); only the ends of the text need one added.
        before, after = context[:pos], context[pos:]
        if before and not before.endswith(kind.joiner):
            before += kind.joiner
        context = before + sentence + (kind.joiner + after if after else "")
    return context
