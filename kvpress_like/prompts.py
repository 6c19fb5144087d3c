"""Prompts in: text or token ids, checked and turned into left-padded ids with a valid mask.

Every rule is checked here, before any model work: a bad prompt is a ``ConfigError`` naming the
prompt (``prompts[i]``), the rule and the value, never an index error deep inside an embedding.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch

from kvpress_like.errors import ConfigError

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
# prompt: chat template when asked (or available); prefix: plain text with special tokens;
# continuation: plain text without them (it follows a compressed context).
Mode = Literal["prompt", "prefix", "continuation"]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Unsigned dtypes wider than a byte: torch compares few of them, and uint64 values past int64's
# range would wrap in the cast, so these go the host's way (as lists) to report the true value.
_CHECKED_AS_LISTS = (torch.uint16, torch.uint32, torch.uint64)


def _tensor_rows(prompts: torch.Tensor) -> torch.Tensor:
    """A tensor of token ids as ``[B, T]``, once its dtype, rank and size are checked."""
    if prompts.dtype == torch.bool or prompts.is_floating_point() or prompts.is_complex():
        raise ConfigError(f"prompts: a tensor of token ids must have an integer dtype (got {prompts.dtype})")
    if prompts.dim() not in (1, 2):
        raise ConfigError(
            f"prompts: a tensor of token ids must be 1-D [T] or 2-D [B, T] (got {prompts.dim()}-D, "
            f"shape {list(prompts.shape)})"
        )
    if prompts.numel() == 0:
        raise ConfigError(
            f"prompts: a tensor of token ids must not be empty (got shape {list(prompts.shape)})"
        )
    return prompts[None] if prompts.dim() == 1 else prompts


def _out_of_range_error(index: int, vocab_size: int, first: int, count: int) -> ConfigError:
    return ConfigError(
        f"prompts[{index}]: token ids must be in [0, {vocab_size}), the model's vocabulary "
        f"(got {first}, one of {count} out of range)"
    )


def use_chat_template(tokenizer: Any, asked: bool | None) -> bool:
    """Whether to wrap text in the tokenizer's chat template: as ``asked`` (None: when it has one);
    asking for one the tokenizer lacks is refused."""
    has = bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")
    if asked and not has:
        raise ConfigError("chat_template: the tokenizer has no chat template (got True); pass False")
    return has if asked is None else asked


class PromptEncoder:
    """Turns prompts into ids for one model and its tokenizer (may be None), on the model's device."""

    def __init__(self, tokenizer: Any, model: Any) -> None:
        self.tokenizer, self.model = tokenizer, model

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def encode(
        self, prompts: Prompts, mode: Mode, chat_template: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids ``[B, T]`` and valid mask ``[B, T]``."""
        device = self.model.get_input_embeddings().weight.device
        if isinstance(prompts, torch.Tensor) and prompts.dtype not in _CHECKED_AS_LISTS:
            # checked where it lies: no trip through host lists
            ids = _tensor_rows(prompts).to(device=device, dtype=torch.long, copy=True)
            self._check_range(ids)
            return ids, torch.ones_like(ids, dtype=torch.bool)
        rows = [self._row(i, prompt, mode, chat_template) for i, prompt in enumerate(self._split(prompts))]
        width = max(map(len, rows))
        pad = self.pad_id()
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
        return ids, valid

    @staticmethod
    def _split(prompts: Any) -> list[Any]:
        """The prompts as a list of rows (each a string or a sequence of ids)."""
        if isinstance(prompts, torch.Tensor):
            return _tensor_rows(prompts).tolist()
        if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray) or len(prompts) == 0:
            raise ConfigError(
                "prompts: must be a non-empty string, list of strings, list of token ids, list of such "
                f"lists or an integer tensor (got {prompts!r:.80})"
            )
        if isinstance(prompts, str) or isinstance(prompts[0], numbers.Number):
            return [prompts]  # one prompt: text, or a row of ids (checked as such)
        return list(prompts)

    def _row(self, index: int, prompt: Any, mode: Mode, chat_template: bool | None) -> list[int]:
        where = f"prompts[{index}]"
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, mode, chat_template)
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            ids = _tensor_rows(prompt)[0].tolist()
        elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
            ids = list(prompt)
            wrong = [t for t in ids if not _is_token_id(t)]
            if wrong:
                raise ConfigError(
                    f"{where}: token ids must be integers (got {type(wrong[0]).__name__} {wrong[0]!r:.40})"
                )
            ids = [int(t) for t in ids]
        else:
            raise ConfigError(
                f"{where}: must be a string or a sequence of token ids (got {type(prompt).__name__})"
            )
        if not ids:
            raise ConfigError(f"{where}: must contain at least one token (got {prompt!r:.40})")
        vocab_size = self.vocab_size
        out_of_range = [t for t in ids if not 0 <= t < vocab_size]
        if out_of_range:
            raise _out_of_range_error(index, vocab_size, out_of_range[0], len(out_of_range))
        return ids

    def _check_range(self, ids: torch.Tensor) -> None:
        """``ids [B, T]`` all within the vocabulary, else the first offending row's error."""
        vocab_size = self.vocab_size
        bad = (ids < 0) | (ids >= vocab_size)
        if bool(bad.any()):  # the one host sync, before any model work
            row = int(bad.any(dim=1).nonzero()[0])
            wrong = ids[row][bad[row]]
            raise _out_of_range_error(row, vocab_size, int(wrong[0]), wrong.numel())

    def _tokenize(self, text: str, mode: Mode, chat_template: bool | None) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise ConfigError(
                "tokenizer: required for text prompts (got None); pass token ids or a tokenizer"
            )
        if not text:
            return []
        if mode == "continuation":
            return tok(text, add_special_tokens=False)["input_ids"]
        if mode == "prompt" and use_chat_template(tok, chat_template):
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    def pad_id(self) -> int:
        """The id padding takes (masked everywhere): the first pad or EOS id the tokenizer or the
        model names that the embedding table holds (a tokenizer's added pad token may lie past it)."""
        for source in (self.tokenizer, self.model.generation_config, self.model.config):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None and 0 <= int(value) < self.vocab_size:
                    return int(value)
        return 0

    def eos_ids(self, generation: Any, device: torch.device) -> torch.Tensor:
        """``[E]``: the generation settings' end-of-sequence ids, else the tokenizer's."""
        for source in (generation, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is not None and value != []:
                ids = value if isinstance(value, list | tuple) else [value]
                return torch.tensor(sorted(set(map(int, ids))), dtype=torch.long, device=device)
        return torch.zeros(0, dtype=torch.long, device=device)
