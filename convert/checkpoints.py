"""PyTorch ``checkpoint.pt`` <-> srp-jax checkpoint directory, both ways, bit-exact.

``.pt -> srp-jax``: the file is read with ``torch.load(weights_only=True)``, checked against
its factorizer config (keys, shapes, dtypes), and saved with
:func:`srp_jax.checkpoint.save_dictionary` together with a *layout* record (the top-level key
order, the name of the state-dict key, the state-dict key order, buffer dtypes and any
top-level entries srp-jax has no field for). ``srp-jax -> .pt`` writes the reference runner
schema, following that layout when there is one, so ``.pt -> srp-jax -> .pt`` returns the same
keys, dtypes and tensor bits. Checkpoints trained in srp-jax (no layout) are written in the
runner schema: ``model_state_dict``, ``factorizer``, ``evaluation``, ``row_mean``,
``row_norms``, ``row_token_ids``, ``metrics`` and ``config``, each optional one only when known.

dtype policy (``dtype``): ``"float32"`` (the default when reading a ``.pt``) stores every
floating array as float32, so bfloat16 sources are widened exactly; ``"bfloat16"`` stores the
factorizer parameters as bfloat16 (float32 sources are rounded) and keeps buffers and row
statistics in their source dtype; ``None`` keeps every dtype as it is.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from srp_jax import factorizers as F
from srp_jax.checkpoint import check_destination, is_srp_checkpoint, load_checkpoint, save_dictionary
from srp_jax.dictionary import Dictionary
from srp_jax.config import FactorizerConfig
from srp_jax.errors import CheckpointError, ShapeError, SrpError

from .pt_io import read_pt, write_pt

DTYPES = ("float32", "bfloat16")
STATE_KEYS = ("model_state_dict", "state_dict")
RUNNER_ORDER = (
    "model_state_dict",
    "factorizer",
    "evaluation",
    "row_mean",
    "row_norms",
    "row_token_ids",
    "metrics",
    "config",
)
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or arr.dtype == _BF16


def _check_dtype_option(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)} (or None to keep), got {dtype!r}")


def _cast_param(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is None or not _is_float(arr):
        return arr
    target = np.float32 if dtype == "float32" else _BF16
    return arr if arr.dtype == target else arr.astype(target)


def _cast_other(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    """Buffers and row statistics: float32 under the float32 policy, else kept."""
    if dtype == "float32" and _is_float(arr) and arr.dtype != np.float32:
        return arr.astype(np.float32)
    return arr


def _as_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bool, int, float)) and not isinstance(value, bool):
        return np.asarray(value)
    raise CheckpointError(f"{where} is a {type(value).__name__}, expected a tensor")


def _row_stat(ckpt: Mapping[str, Any], key: str, source: str, dtype: str | None) -> np.ndarray | None:
    value = ckpt.get(key)
    if value is None:
        return None
    arr = _as_array(value, f"{source}: {key!r}")
    if arr.ndim != 1:
        raise ShapeError(f"{source}: {key!r} must be 1-D, got shape {arr.shape}")
    if key == "row_token_ids":
        if arr.dtype.kind not in "iu":
            raise ShapeError(f"{source}: 'row_token_ids' must hold integers, got dtype {arr.dtype}")
        return arr
    if not _is_float(arr):
        raise ShapeError(f"{source}: {key!r} must be floating point, got dtype {arr.dtype}")
    return _cast_other(arr, dtype)


def _jax_or_host(arr: np.ndarray | None) -> Any:
    if arr is None:
        return None
    return jnp.asarray(arr) if arr.dtype in (np.float32, _BF16, np.float16) else arr


def dictionary_from_pt_dict(
    ckpt: Mapping[str, Any], *, dtype: str | None = "float32", source: str = "checkpoint"
) -> tuple[Dictionary, dict[str, Any]]:
    """A loaded ``.pt`` dict (NumPy arrays, as :func:`convert.pt_io.read_pt` returns) ->
    ``(Dictionary, layout)``. Raises an :class:`SrpError` naming ``source`` on any problem."""
    _check_dtype_option(dtype)
    try:
        return _dictionary_from_pt_dict(ckpt, dtype=dtype, source=source)
    except SrpError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed content of any kind: one clear line
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"{source}: malformed checkpoint ({type(exc).__name__}: {text})") from None


def _dictionary_from_pt_dict(
    ckpt: Mapping[str, Any], *, dtype: str | None, source: str
) -> tuple[Dictionary, dict[str, Any]]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a checkpoint dict, found {type(ckpt).__name__}")
    bad = [k for k in ckpt if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{source}: top-level keys must be strings, found {bad[0]!r}")
    state_key = next((k for k in STATE_KEYS if isinstance(ckpt.get(k), Mapping) and ckpt.get(k)), None)
    if state_key is None:
        raise CheckpointError(f"{source}: no 'model_state_dict' or 'state_dict' holding the weights")
    state = ckpt[state_key]
    block = ckpt.get("factorizer")
    config = ckpt.get("config")
    if not block and not (isinstance(config, Mapping) and config.get("factorizer")):
        from srp_jax.errors import MissingConfigError

        raise MissingConfigError(f"{source}: no factorizer config (looked for 'factorizer' and 'config.factorizer')")

    # Buffers keep their source dtype (ints always; floats unless the float32 policy).
    buffer_keys = set(F.buffer_keys(_architecture_name(block, config, source)))
    cast_state: OrderedDict[str, Any] = OrderedDict()
    buffer_dtypes: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: state-dict keys must be strings, found {key!r}")
        arr = _as_array(value, f"{source}: {state_key}[{key!r}]")
        if key in buffer_keys:
            arr = _cast_other(arr, dtype)
            buffer_dtypes[key] = arr.dtype.name
        elif _is_float(arr):
            arr = _cast_param(arr, dtype)
        cast_state[key] = arr
    patched = dict(ckpt)
    patched[state_key] = cast_state
    if state_key == "state_dict":
        patched.pop("model_state_dict", None)  # from_checkpoint_dict prefers it (it was falsy)
    for key in ("row_mean", "row_norms"):  # validated and cast below; keep the core's f32 cast out
        patched.pop(key, None)
    dictionary = Dictionary.from_checkpoint_dict(patched, source=source)
    rows = {key: _row_stat(ckpt, key, source, dtype) for key in ("row_mean", "row_norms", "row_token_ids")}
    if rows["row_mean"] is not None and rows["row_mean"].shape[0] != dictionary.d_model:
        raise ShapeError(
            f"{source}: 'row_mean' has length {rows['row_mean'].shape[0]}, expected d_model={dictionary.d_model}"
        )
    if rows["row_norms"] is not None and rows["row_token_ids"] is not None:
        if rows["row_norms"].shape != rows["row_token_ids"].shape:
            raise ShapeError(
                f"{source}: 'row_norms' has {rows['row_norms'].shape[0]} rows but 'row_token_ids' has "
                f"{rows['row_token_ids'].shape[0]}"
            )
    dictionary.row_mean = _jax_or_host(rows["row_mean"])
    dictionary.row_norms = _jax_or_host(rows["row_norms"])
    dictionary.row_token_ids = rows["row_token_ids"]

    # What srp-jax has no field for stays verbatim in the layout's "extra".
    extra: dict[str, Any] = {}
    for key, value in ckpt.items():
        if key in STATE_KEYS:
            if key != state_key:
                extra[key] = value
        elif key == "factorizer":
            if not value:
                extra[key] = value
        elif key in ("evaluation", "metrics", "config"):
            if not isinstance(value, Mapping):
                extra[key] = value
        elif key in ("row_mean", "row_norms", "row_token_ids"):
            if value is None:
                extra[key] = value
        else:
            extra[key] = value
    if isinstance(ckpt.get("metrics"), Mapping):
        dictionary.metrics = ckpt["metrics"] if isinstance(ckpt["metrics"], dict) else dict(ckpt["metrics"])
    layout = {
        "top_level": list(ckpt.keys()),
        "state_key": state_key,
        "state_order": list(state.keys()),
        "state_ordered_dict": isinstance(state, OrderedDict),
        "buffer_dtypes": buffer_dtypes,
        "extra": extra,
    }
    return dictionary, layout


def _architecture_name(block: Any, config: Any, source: str) -> str:
    """The architecture a ``.pt``'s factorizer block names (validated against the registry)."""
    if not block and isinstance(config, Mapping):
        block = config.get("factorizer")
    if not isinstance(block, Mapping):
        raise CheckpointError(f"{source}: factorizer config must be a dict, got {type(block).__name__}")
    try:
        return FactorizerConfig.from_dict(block, strict=False).architecture
    except SrpError as exc:
        raise type(exc)(f"{source}: factorizer config: {exc}") from None


def pt_dict_from_dictionary(
    dictionary: Dictionary, layout: Mapping[str, Any] | None = None, *, dtype: str | None = None
) -> dict[str, Any]:
    """``Dictionary`` (+ the layout of the ``.pt`` it came from) -> a reference checkpoint dict
    of NumPy arrays and Python values, ready for :func:`convert.pt_io.write_pt`."""
    _check_dtype_option(dtype)
    layout = dict(layout or {})
    state = F.variables_to_state_dict(dictionary.params, dictionary.buffers, dictionary.config)
    buffer_dtypes = layout.get("buffer_dtypes") or {}
    for key, arr in list(state.items()):
        if key in buffer_dtypes:
            target = np.dtype(ml_dtypes.bfloat16) if buffer_dtypes[key] == "bfloat16" else np.dtype(buffer_dtypes[key])
            arr = arr.astype(target)
            state[key] = _cast_other(arr, dtype)
        elif key not in F.buffer_keys(dictionary.config):
            state[key] = _cast_param(np.asarray(arr), dtype)
    order = layout.get("state_order")
    if order and set(order) == set(state):
        state = {key: state[key] for key in order}
    state_dict = OrderedDict(state) if layout.get("state_ordered_dict", True) else dict(state)

    values: dict[str, Any] = {layout.get("state_key") or "model_state_dict": state_dict}
    if dictionary.factorizer_block:
        values["factorizer"] = dict(dictionary.factorizer_block)
    else:
        values["factorizer"] = dictionary.config.to_dict()
    if dictionary.evaluation is not None:
        values["evaluation"] = dictionary.evaluation
    for key in ("row_mean", "row_norms"):
        value = getattr(dictionary, key)
        if value is not None:
            values[key] = _cast_other(np.asarray(value), dtype)
    if dictionary.row_token_ids is not None:
        values["row_token_ids"] = np.asarray(dictionary.row_token_ids)
    if dictionary.metrics is not None:
        values["metrics"] = dictionary.metrics
    if dictionary.source_config is not None:
        values["config"] = dictionary.source_config
    values.update(layout.get("extra") or {})

    top = layout.get("top_level")
    if not top:
        return {key: values[key] for key in RUNNER_ORDER if key in values}
    out = {key: values[key] for key in top if key in values}
    for key in RUNNER_ORDER:  # fields added since the conversion (e.g. metrics of a re-evaluation)
        if key in values and key not in out and key != "factorizer" and key != "model_state_dict":
            out[key] = values[key]
    return out


def _is_regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def pt_to_dictionary(src: str | os.PathLike, *, dtype: str | None = "float32") -> tuple[Dictionary, dict[str, Any]]:
    """Read a ``.pt`` file -> ``(Dictionary, layout)``."""
    _check_dtype_option(dtype)
    ckpt = read_pt(src, keep_bfloat16=True)
    return dictionary_from_pt_dict(ckpt, dtype=dtype, source=str(src))


def pt_to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    dtype: str | None = "float32",
    check: Callable[[Dictionary], None] | None = None,
) -> Path:
    """Convert ``checkpoint.pt`` to an srp-jax checkpoint directory ``dst`` (atomic).

    ``check(dictionary)`` runs after reading and before writing (e.g. the registry check of
    a Hub download); whatever it raises leaves no output."""
    dst = Path(dst)
    check_destination(dst, force=force, sources=(src,), replaceable=is_srp_checkpoint, what="an srp-jax checkpoint")
    dictionary, layout = pt_to_dictionary(src, dtype=dtype)
    if check is not None:
        check(dictionary)
    return save_dictionary(dictionary, dst, force=force, layout=layout)


def orbax_to_pt(
    src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False, dtype: str | None = None
) -> Path:
    """Convert an srp-jax checkpoint directory (or run directory) to ``checkpoint.pt`` (atomic)."""
    _check_dtype_option(dtype)
    dst = Path(dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; the .pt destination must be a file path")
    check_destination(dst, force=force, sources=(src,), replaceable=_is_regular_file, what="a file")
    loaded = load_checkpoint(src)
    write_pt(pt_dict_from_dictionary(Dictionary(**loaded.contents), loaded.layout, dtype=dtype), dst)
    return dst


def hub_to_orbax(
    spec: str,
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    dtype: str = "float32",
    verify: bool = True,
) -> tuple[Path, Path]:
    """Fetch a published dictionary (``"<model>/<op>"``) and write it as an srp-jax checkpoint
    at ``out``. The download is checked against the registry (``verify``) before anything is
    written. Returns ``(out, downloaded .pt path)``."""
    from srp_jax import hub

    entry = hub.find_entry(spec)
    src = hub.fetch_checkpoint(entry.path, repo_id=repo_id, revision=revision, cache_dir=cache_dir)
    check = (lambda d: hub.verify_entry(d, entry, source=src)) if verify else None
    return pt_to_orbax(src, out, force=force, dtype=dtype, check=check), src


fetch_to_checkpoint = hub_to_orbax  # the name this had in srp_jax.hub


def dictionary_to_pt(
    dictionary: Dictionary, dst: str | os.PathLike, *, force: bool = False, dtype: str | None = None
) -> Path:
    """Write a ``Dictionary`` (e.g. fresh from training) as a reference-schema ``.pt``."""
    dst = Path(dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; the .pt destination must be a file path")
    check_destination(dst, force=force, replaceable=_is_regular_file, what="a file")
    write_pt(pt_dict_from_dictionary(dictionary, None, dtype=dtype), dst)
    return dst


__all__ = [
    "DTYPES",
    "dictionary_from_pt_dict",
    "pt_dict_from_dictionary",
    "pt_to_dictionary",
    "pt_to_orbax",
    "orbax_to_pt",
    "dictionary_to_pt",
    "hub_to_orbax",
]
