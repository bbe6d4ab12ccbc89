"""The srp-jax cache folder, in its own module so low layers (the native kernels under
factorizers) can find it without importing :mod:`srp_jax.sources` and what that pulls in."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SRP_JAX_CACHE"


def cache_root() -> Path:
    """The srp-jax cache folder: ``$SRP_JAX_CACHE``, else ``$XDG_CACHE_HOME/srp-jax``, else
    ``~/.cache/srp-jax``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "srp-jax"


__all__ = ["CACHE_ENV", "cache_root"]
