"""The installed package version (``0.0.0+unknown`` from a bare checkout)."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("srp-jax")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"
