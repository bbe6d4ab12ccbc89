"""Reading and writing PyTorch ``.pt`` checkpoints (with ``convert.torch_runtime``, the only importers of torch).

``read_pt`` uses ``torch.load(weights_only=True)`` only: a pickle that would run code (any
global outside torch's weights-only allow-list, such as ``os.system``) is refused by torch's
restricted unpickler before anything in it executes. Tensors come back as NumPy arrays
(bfloat16 kept via ml_dtypes when asked, else cast to float32). ``write_pt`` turns NumPy arrays
back into tensors and writes atomically (temporary file beside the target, then rename), so a
failed write never leaves a half-written file.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch

from srp_jax._atomic import atomic_file
from srp_jax.errors import CheckpointError


def _tensor_to_numpy(t: torch.Tensor, keep_bfloat16: bool) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        if keep_bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.float().numpy().copy()
    return t.contiguous().numpy().copy()


def _to_numpy_tree(obj: Any, keep_bfloat16: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        return _tensor_to_numpy(obj, keep_bfloat16)
    if isinstance(obj, Mapping):
        items = ((k, _to_numpy_tree(v, keep_bfloat16)) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_to_numpy_tree(v, keep_bfloat16) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_numpy_tree(v, keep_bfloat16) for v in obj)
    return obj


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def _load_failure_detail(exc: BaseException) -> str:
    """The informative line of torch's multi-line load error (not its advice boilerplate)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    if useful:
        return useful[0]
    for ln in lines:  # "... WeightsUnpickler error: <detail>" sometimes shares the advice line
        if "error:" in ln and ln.rsplit("error:", 1)[1].strip():
            return ln.rsplit("error:", 1)[1].strip()
    return _first_line(exc)


def _verify_zip_records(path: Path) -> None:
    """Check every record of a zip-format ``.pt`` against its CRC-32 (torch writes one per
    record), so damaged bytes anywhere — pickle, tensor data, metadata — are reported instead
    of loading silently. Legacy (non-zip) pickles have no checksums and are not checked."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            names = [i.filename for i in archive.infolist()]
            bad = archive.testzip()
            # torch's reader (miniz) takes a record with the MS-DOS directory attribute for a
            # folder and hands back uninitialised memory for its tensor: no tensor record is one
            flagged = [i.filename for i in archive.infolist() if i.external_attr & 0x10 or i.filename.endswith("/")]
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, struct.error... on a damaged archive
        raise CheckpointError(f"{path}: damaged zip archive ({type(exc).__name__}: {_first_line(exc)})") from None
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        # torch (miniz) and zipfile read different copies of a duplicated record: refuse it
        raise CheckpointError(f"{path}: the zip archive holds record {duplicates[0]!r} more than once (damaged or forged)")
    if bad is not None:
        raise CheckpointError(f"{path}: record {bad!r} fails its CRC-32 check (the file is damaged)")
    if flagged:
        raise CheckpointError(f"{path}: record {flagged[0]!r} is marked as a directory (the file is damaged)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def read_pt(path: str | os.PathLike, *, keep_bfloat16: bool = False) -> dict[str, Any]:
    """Load ``path`` with ``weights_only=True`` and return a dict tree of NumPy arrays.

    Every failure (missing, empty, truncated or damaged file, a pickle that asks for code to
    run, a top level that is not a dict) is one :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (a .pt checkpoint is a single file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    _verify_zip_records(path)
    try:
        with warnings.catch_warnings():  # torch's advice about legacy files would reach stderr
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        globals_asked = [ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln]
        if globals_asked:
            detail = globals_asked[0]
            raise CheckpointError(
                f"{path}: refused: the pickle asks to run code, which a weights-only load never does ({detail[:200]})"
            ) from None
        detail = _load_failure_detail(exc)
        raise CheckpointError(
            f"{path}: not a loadable weights-only checkpoint, truncated or damaged ({type(exc).__name__}: {detail[:300]})"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    try:
        return _to_numpy_tree(obj, keep_bfloat16)
    except Exception as exc:  # noqa: BLE001 - e.g. a tensor of a dtype NumPy cannot hold
        raise CheckpointError(f"{path}: a tensor cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None


def _to_torch_tree(obj: Any) -> Any:
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or type(obj).__module__.startswith("jax") and hasattr(obj, "shape"):
        arr = np.array(obj, copy=True, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        if arr.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)
    if isinstance(obj, Mapping):
        items = ((k, _to_torch_tree(v)) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_to_torch_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_torch_tree(v) for v in obj)
    return obj


def write_pt(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a dict tree (NumPy/JAX arrays become tensors) to ``path`` atomically.

    ``torch.save`` names the archive's root folder after the file it writes (``checkpoint.pt``
    -> ``checkpoint/``), so the temp file carries the destination's own name (inside a private
    temp folder): the same content always gives the same bytes, with the root the reference's
    files have."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; a .pt checkpoint is a file")
    payload = _to_torch_tree(obj)
    with atomic_file(path, keep_name=True) as tmp:
        torch.save(payload, tmp)
