"""Reading and writing PyTorch ``.pt`` checkpoints (the only module family that imports torch).

``read_pt`` uses ``torch.load(weights_only=True)`` only: a pickle that would run code is refused
by torch's restricted unpickler and nothing in it executes. Tensors come back as NumPy arrays
(bfloat16 via ml_dtypes, or cast to float32). ``write_pt`` converts NumPy arrays back to tensors
and writes atomically (temp file + rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch

from srp_jax.errors import CheckpointError


def _tensor_to_numpy(t: torch.Tensor, keep_bfloat16: bool) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        if keep_bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.float().numpy().copy()
    return t.numpy().copy()


def _to_numpy_tree(obj: Any, keep_bfloat16: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        return _tensor_to_numpy(obj, keep_bfloat16)
    if isinstance(obj, Mapping):
        return {k: _to_numpy_tree(v, keep_bfloat16) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy_tree(v, keep_bfloat16) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_numpy_tree(v, keep_bfloat16) for v in obj)
    return obj


def read_pt(path: str | os.PathLike, *, keep_bfloat16: bool = False) -> dict[str, Any]:
    """Load ``path`` with ``weights_only=True`` and return a dict tree of NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {msg})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    return _to_numpy_tree(obj, keep_bfloat16)


def _to_torch_tree(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic) and not isinstance(obj, (np.bool_,)):
        arr = np.asarray(obj)
        if arr.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        if arr.ndim == 0 and isinstance(obj, np.generic):
            return obj.item()
        return torch.from_numpy(np.ascontiguousarray(arr).copy())
    if hasattr(obj, "__jax_array__") or type(obj).__module__.startswith("jax"):
        return _to_torch_tree(np.asarray(obj))
    if isinstance(obj, Mapping):
        return {k: _to_torch_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_torch_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_torch_tree(v) for v in obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_pt(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a dict tree (NumPy arrays become tensors) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _to_torch_tree(obj)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
