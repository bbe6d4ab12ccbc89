"""The one bridge from ``srp_jax`` to ``convert`` (the only package that imports torch).

Reached lazily, so ``import srp_jax`` never imports torch; without torch the error names the
``convert`` extra to install.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from .errors import DependencyError

INSTALL_HINT = "install the 'convert' extra: pip install 'srp-jax[convert]' (it pins torch==2.13.0)"


def torch_available() -> bool:
    """Whether torch can be imported (without importing it)."""
    if "torch" in sys.modules:
        return sys.modules["torch"] is not None
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def require_torch(what: str) -> None:
    if not torch_available():
        raise DependencyError(f"{what} needs PyTorch, which is not installed; {INSTALL_HINT}")


def read_pt(path, **kwargs: Any) -> dict[str, Any]:
    """Read a ``.pt`` checkpoint safely (``torch.load(weights_only=True)``) into NumPy."""
    require_torch(f"reading {path}")
    from convert.pt_io import read_pt as _read

    return _read(path, **kwargs)


def dictionary_to_pt(dictionary: Any, path, **kwargs: Any) -> Any:
    """Write a ``Dictionary`` as a reference runner-schema ``checkpoint.pt`` (atomically)."""
    require_torch(f"writing {path}")
    from convert.checkpoints import dictionary_to_pt as _export

    return _export(dictionary, path, **kwargs)
