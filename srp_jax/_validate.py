"""Scalar coercion for configuration values: one place that turns YAML/CLI values into typed
values or raises a :class:`~srp_jax.errors.ConfigError` naming the key.

Used by the run configuration (:mod:`srp_jax.config`) and by each architecture's own config
keys (:mod:`srp_jax.factorizers`), so both report bad values the same way.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError


def as_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False
) -> int | None:
    """An integer (``3``, ``3.0``, ``"3"`` from a CLI override); bools, fractions and NaN refused;
    ``minimum`` / ``maximum`` inclusive."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        as_float_value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if not math.isfinite(as_float_value) or as_float_value != int(as_float_value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    out = int(value) if isinstance(value, int) else int(as_float_value)
    if minimum is not None and out < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {out}")
    return out


def as_float(name: str, value: Any, *, allow_none: bool = False, minimum: float | None = None) -> float | None:
    """A finite float; ``minimum`` (inclusive) optional."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if minimum is not None and out < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {out}")
    return out


_UNSET_VARIABLE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def expand_path(name: str, value: str) -> str:
    """``value`` with ``~`` and ``$VAR`` / ``${VAR}`` expanded; a variable that is not set is a
    :class:`ConfigError` naming it (a literal ``${NOPE}`` folder is never created), and so is an
    empty path."""
    text = str(value)
    if not text.strip():
        raise ConfigError(f"{name} is empty (give a path)")
    expanded = os.path.expanduser(os.path.expandvars(text))
    left = _UNSET_VARIABLE.search(expanded)
    if left is not None:
        var = left.group(1).strip("{}")
        raise ConfigError(f"{name} {text!r} uses the environment variable {var}, which is not set")
    return expanded


def as_list(name: str, value: Any) -> list[Any]:
    """A YAML list (None -> []); a scalar or a mapping is an error naming the key."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    return list(value)


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def as_str(name: str, value: Any, *, allow_none: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def unknown_keys(block: str, given: Mapping[str, Any], known: set[str]) -> None:
    """Raise naming every key of ``given`` outside ``known``."""
    extra = sorted(set(given) - known)
    if extra:
        raise ConfigError(f"unknown key(s) in {block}: {', '.join(extra)} (known: {', '.join(sorted(known))})")


__all__ = ["as_int", "as_float", "as_list", "as_bool", "as_str", "unknown_keys", "expand_path"]
