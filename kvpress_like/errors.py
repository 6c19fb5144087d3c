"""The errors kvpress_like raises on purpose, each naming the field (or plugin), the rule and the value.

Every one derives from ``KvpressLikeError``, so a caller can tell a refused input or a broken
plugin from a bug: anything else escaping a pipeline call is a defect.
"""

from __future__ import annotations

from pydantic import ValidationError


class KvpressLikeError(Exception):
    """Base of every error kvpress_like raises on purpose."""


class ConfigError(KvpressLikeError, ValueError):
    """A setting, a strategy name or an input breaks a rule (raised before any model work)."""


class UnsupportedModelError(ConfigError):
    """The model's architecture is not one the adapter knows how to drive."""


class ContextFileError(ConfigError):
    """A saved context cannot be loaded here: damaged, of a newer format, or made by another model
    or tokenizer. Names the file, the field and what was expected."""


class PluginError(KvpressLikeError, RuntimeError):
    """A strategy plugin broke its hook's contract, or raised: names the plugin and the hook."""


def config_error_from(exc: ValidationError, prefix: str) -> ConfigError:
    """Turn pydantic's report into one readable line per broken field."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        message = err["msg"].removeprefix("Value error, ")
        # A whole-model rule names its fields and value in its own message.
        lines.append(
            f"{field}: {message}" if not err["loc"] else f"{field}: {message} (got {err.get('input')!r})"
        )
    return ConfigError("; ".join(lines))
