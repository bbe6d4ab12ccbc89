"""The architecture registry: ``factorizer.architecture`` name -> :class:`Architecture`.

The six built-in architectures register themselves when :mod:`srp_jax.factorizers` is
imported. Adding one is a module with an :class:`~srp_jax.factorizers.base.Architecture`
subclass plus one ``register(MyArchitecture())`` call; every consumer (config validation,
kernels, training, Flax shell, checkpoints, ``.pt`` conversion, decomposition) looks the
architecture up here instead of branching on its name.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Architecture, Option

_REGISTRY: dict[str, Architecture] = {}


def register(architecture: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``architecture`` under its ``name``; returns it (usable as a one-liner)."""
    if not isinstance(architecture, Architecture):
        raise ConfigError(f"register() needs an Architecture instance, got {type(architecture).__name__}")
    name = architecture.name
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{type(architecture).__name__} has no name")
    if name in _REGISTRY and not replace:
        raise ConfigError(f"architecture {name!r} is already registered (pass replace=True to override)")
    for key, option in architecture.options.items():
        other = known_option(key)
        if other is not None and other.default != option.default:
            # one key, one meaning: a second owner must agree on the default
            raise ConfigError(f"{name}: config key {key!r} is already defined by another architecture with default {other.default!r}")
    _REGISTRY[name] = architecture
    return architecture


def unregister(name: str) -> None:
    """Remove a registered architecture (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def get_architecture(name: str) -> Architecture:
    """The registered architecture called ``name`` (ConfigError listing the known ones)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown factorizer architecture {name!r} (expected one of: {', '.join(_REGISTRY)})"
        ) from None


def architecture_names() -> tuple[str, ...]:
    """Every registered name, built-ins first, in registration order."""
    return tuple(_REGISTRY)


def known_option(key: str) -> Option | None:
    """The :class:`Option` some registered architecture declares for ``key``, or None."""
    for architecture in _REGISTRY.values():
        if key in architecture.options:
            return architecture.options[key]
    return None


__all__ = ["register", "unregister", "get_architecture", "architecture_names", "known_option"]
