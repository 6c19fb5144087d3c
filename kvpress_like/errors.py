"""Errors raised before any model work, each naming the field, the rule and the value."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A setting, a strategy name or an input breaks a rule."""


class UnsupportedModelError(ConfigError):
    """The model's architecture is not one the adapter knows how to drive."""


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
