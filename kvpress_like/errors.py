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
        lines.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError("; ".join(lines))
