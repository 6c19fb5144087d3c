"""Command-line inputs: argparse types with one-line rules, and the checks of the files and model
paths a user names, each failure a ConfigError naming the option. Imports neither torch nor
transformers at module level (``--help`` stays fast)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpress_like.errors import ConfigError


def bounded(
    kind: type[int] | type[float], low: float, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    rule = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high is not None else f">= {low:g}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:  # argparse would only say "invalid parse value"
            raise argparse.ArgumentTypeError(f"must be {noun} {rule} (got {text!r})") from None
        above = value > low if low_open else value >= low
        if not (above and (high is None or value <= high)):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {noun} {rule} (got {text})")
        return value

    return parse


def choice(options: tuple[str, ...] | list[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"must be among {', '.join(options)} (got {text!r})")
        return text

    return parse


def csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """``a,b,c`` -> ``[kind(a), kind(b), kind(c)]``; at least one value."""

    def parse(text: str) -> list:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"must list at least one value (got {text!r})")
        return values

    return parse


def read_prompt_file(path: str, option: str = "--prompt-file") -> str:
    """The file's text; missing, a directory, unreadable, not UTF-8 or empty is a ConfigError."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{option}: must exist (got {path!r})")
    if file.is_dir():
        raise ConfigError(f"{option}: must be a file, not a directory (got {path!r})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{option}: must be UTF-8 text, byte {exc.start} is not (got {path!r})") from None
    except OSError as exc:  # permissions, a broken symlink, an I/O error
        raise ConfigError(f"{option}: must be readable, {exc.strerror or exc} (got {path!r})") from None
    if not text.strip():
        raise ConfigError(f"{option}: must not be empty (got {path!r})")
    return text


def _looks_like_path(value: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else path-like is meant as a local folder."""
    return (
        value.startswith((".", "~", os.sep))
        or value.endswith(os.sep)
        or value.count("/") > 1
        or (os.altsep is not None and os.altsep in value)
    )


def _local_model_dir(value: str, option: str) -> Path | None:
    """The local folder ``value`` names (checked to hold a model), or None for a Hub id."""
    path = Path(value).expanduser()
    if not path.exists():
        if _looks_like_path(value):
            raise ConfigError(f"{option}: must be an existing model directory (got {value!r})")
        return None
    if not path.is_dir():
        raise ConfigError(f"{option}: must be a model directory or a Hub id, not a file (got {value!r})")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{option}: must be a directory holding a model, it has no config.json (got {value!r})"
        )
    return path


# What transformers raises for a folder or Hub id it cannot load: missing or corrupt files, an
# unknown model_type, a missing tokenizer backend, mismatched weights.
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError)


def _load_error(exc: Exception, value: str, option: str) -> Exception:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return ConfigError(f"{option}: must name a model transformers can load, {reason} (got {value!r})")


def check_model_arg(value: str, option: str = "--model") -> None:
    """Refuse a ``--model`` path that cannot hold a model, without importing torch (quick)."""
    if value != "smollm2":  # models.DEFAULT_MODEL; importing models would import torch
        _local_model_dir(value, option)


def load_model_arg(value: str, option: str = "--model") -> tuple[Any, Any]:
    """``models.load_model`` for a command-line value: a bad path or model is a ConfigError."""
    from kvpress_like import models
    from kvpress_like.errors import KvpressLikeError

    local = _local_model_dir(value, option) if value != models.DEFAULT_MODEL else None
    try:
        return models.load_model(str(local) if local is not None else value)
    except KvpressLikeError:
        raise
    except _LOAD_ERRORS as exc:
        raise _load_error(exc, value, option) from exc


def local_tokenizer(value: str, option: str = "--model") -> Any | None:
    """The tokenizer of a model that is on disk already (a folder, or the converted SmolLM2), loaded
    without the model, so inputs can be checked against it first; None where only a full load
    (a Hub download, the first SmolLM2 conversion) would give it."""
    from kvpress_like import models

    if value == models.DEFAULT_MODEL:
        path = models.cache_dir() / "smollm2-135m-instruct"  # where models.load_smollm2 keeps it
        if not (path / "config.json").is_file():
            return None
    else:
        path = _local_model_dir(value, option)
        if path is None:
            return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except _LOAD_ERRORS as exc:
        raise _load_error(exc, value, option) from exc


def check_device(device: str | None):
    """``--device`` as a torch device that exists here, or None."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"--device: must be a torch device such as cpu, cuda or cuda:1 (got {device!r})"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if not count or (parsed.index or 0) >= count:
            rule = (
                f"an index below {count}, the CUDA devices here"
                if count
                else "a CUDA device; this machine has none"
            )
            raise ConfigError(f"--device: must name {rule} (got {device!r})")
    return parsed
