"""Passkey prompts built from the text shipped in ``kvpress_like/eval/data/passkey.yaml``.

``kvpress-like demo`` uses them too, so this module needs only the core install.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import yaml


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    depth: float  # where the needle sits, 0 = start of the filler, 1 = end


@cache
def _template() -> dict[str, str]:
    return yaml.safe_load(files("kvpress_like.eval").joinpath("data/passkey.yaml").read_text())


def passkey_prompt(tokenizer, target_tokens: int, depth: float, seed: int) -> PasskeyPrompt:
    """A prompt of about ``target_tokens`` tokens with a 5-digit key at ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: must be in [0, 1] (got {depth})")
    parts = _template()
    key = str(random.Random(seed).randint(10000, 99999))
    needle = parts["needle"].format(key=key)
    fixed = len(tokenizer(f"{parts['intro']} {needle} {parts['question']}")["input_ids"])
    per_filler = len(tokenizer(" " + parts["filler"], add_special_tokens=False)["input_ids"])
    repeats = max(1, (target_tokens - fixed) // per_filler)
    before = round(repeats * depth)
    filler = [parts["filler"]] * repeats
    body = " ".join([*filler[:before], needle, *filler[before:]])
    return PasskeyPrompt(f"{parts['intro']} {body} {parts['question']}", key, depth)


def found_key(answer: str, key: str) -> bool:
    """True when the first 5-digit number in the answer is the key."""
    match = re.search(r"\d{5}", answer)
    return match is not None and match.group() == key
