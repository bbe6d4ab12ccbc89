"""The one bridge from ``srp_jax`` to torch: ``.pt`` file I/O lives in ``convert.pt_io`` and
running a model (the ``extract`` extra) in ``convert.torch_runtime`` (the only modules
importing torch), reached lazily from here, so ``import srp_jax`` never imports torch; without
torch the error names the extra to install.

Code above :mod:`srp_jax.dictionary` (the training loop's ``.pt`` export, the CLI) calls
:func:`require_torch` and then uses ``convert.checkpoints`` (Dictionary <-> ``.pt`` schema),
which itself reads and writes files through ``convert.pt_io``.
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


def write_pt(obj: Any, path, **kwargs: Any) -> Any:
    """Write a checkpoint dict of NumPy arrays and plain values as a ``.pt`` file (atomically)."""
    require_torch(f"writing {path}")
    from convert.pt_io import write_pt as _write

    return _write(obj, path, **kwargs)


def torch_runtime(what: str = "running a model") -> Any:
    """The ``convert.torch_runtime`` module (``.torch``, ``.dtype(name)``) for code that drives a
    torch model (``srp_jax.extract``); without torch a DependencyError naming the extract extra."""
    if not torch_available():
        raise DependencyError(
            f"{what} needs PyTorch, which is not installed; install the 'extract' extra: pip install 'srp-jax[extract]'"
        )
    from convert import torch_runtime as runtime

    return runtime
