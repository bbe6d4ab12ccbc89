"""srp-jax: Sparse Readout Prism in JAX/Flax (public API assembled below)."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("srp-jax")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"

from .config import EvaluationConfig, FactorizerConfig
from .dictionary import Dictionary, load_factorizer
from .errors import *  # noqa: F401,F403
