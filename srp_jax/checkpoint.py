"""The srp-jax checkpoint format: an Orbax array tree plus one self-verifying JSON file.

A checkpoint is a directory::

    <path>/
      srp_checkpoint.json   format name/version, every metadata block, a sha256 per array,
                            a sha256 per file of arrays/, and a sha256 of all of that
      arrays/               an Orbax (StandardCheckpointer) tree:
                              params/...   the factorizer parameters (dtypes kept, bf16 too)
                              buffers/...  batch_topk / jumprelu buffers (absent when empty)
                              rows/...     row_mean, row_norms, row_token_ids (int64) when known

Loading checks, in order: the JSON parses and its own checksum holds; every file of
``arrays/`` exists with its recorded size and sha256; Orbax restores the tree; every restored
array has the recorded shape, dtype and sha256 of its raw bytes. Any damage therefore ends in a
:class:`~srp_jax.errors.CheckpointError` naming the path and the file or array at fault.

Sharded restores (arrays placed on a mesh, possibly spread over hosts) never gather an array
to check it: each parameter also records **block checksums**, the sha256 of equal slices
along each axis (as many blocks as the largest power of two dividing the axis, at most
:data:`MAX_BLOCKS`), and each host hashes the blocks that lie inside the shards it holds
(a shard split along one axis is a union of whole blocks for any power-of-two split up to
``MAX_BLOCKS``). In a multi-host restore the hosts also share the file checks between them.

Metadata blocks (``factorizer``, ``evaluation``, ``metrics``, the Hub ``config`` block and,
for files that came from a ``.pt``, that file's layout) are kept verbatim: JSON plus tags for
the few Python values JSON lacks (tuples, non-string keys, bytes, small NumPy arrays stored
bit-exactly as base64).

Saving is atomic (a temporary directory beside the target, renamed into place) and done by one
process (in a multi-host run, process 0 alone: it calls this with host arrays). Loading can place params and buffers on any
``jax.sharding.Sharding`` (restored directly onto it through ``jax.ShapeDtypeStruct`` targets).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import factorizers as F
from ._atomic import check_writable_parent, clean_stale_siblings, old_prefix, publish_permissions, sha256_of_file, temp_prefix
from .config import FactorizerConfig
from .errors import CheckpointError, OutputError, ShapeError, SrpError

FORMAT_NAME = "srp-jax-dictionary"
FORMAT_VERSION = 1
METADATA_FILE = "srp_checkpoint.json"
ARRAYS_DIR = "arrays"
RUN_SUBDIR = "checkpoint"  # a training run directory keeps its dictionary here

_TAG = "__srp_type__"
_DICTIONARY_FIELDS = ("config", "params", "buffers", "d_model", "row_mean", "row_norms", "row_token_ids",
                      "metrics", "evaluation", "factorizer_block", "source_config")
_ROW_KEYS = ("row_mean", "row_norms", "row_token_ids")
_JAX_FLOATS = ("float32", "bfloat16", "float16")
MAX_BLOCKS = 256  # block checksums per axis (a power of two)


# --------------------------------------------------------------------------------------------
# Verbatim JSON for metadata blocks


def encode_value(value: Any, where: str = "metadata") -> Any:
    """A Python/NumPy value -> JSON-able data that :func:`decode_value` restores exactly."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise CheckpointError(f"{where}: object arrays cannot be stored")
        return {
            _TAG: "ndarray" if isinstance(value, (np.ndarray, jax.Array)) else "scalar",
            "dtype": _dtype_name(arr.dtype),
            "shape": list(arr.shape),
            "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"),
        }
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "value": repr(value)}
    if isinstance(value, bytes):
        return {_TAG: "bytes", "data": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) for k in value) and _TAG not in value
        if plain and type(value) is dict:
            return {k: encode_value(v, f"{where}.{k}") for k, v in value.items()}
        return {
            _TAG: "ordered_dict" if type(value).__name__ == "OrderedDict" else "dict",
            "items": [[encode_value(k, where), encode_value(v, f"{where}.{k}")] for k, v in value.items()],
        }
    raise CheckpointError(f"{where}: cannot store a value of type {type(value).__name__} in checkpoint metadata")


def decode_value(data: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(_TAG)
    if tag is None:
        return {k: decode_value(v) for k, v in data.items()}
    if tag == "float":
        return float(data["value"])
    if tag in ("ndarray", "scalar"):
        dtype = _dtype_from_name(data["dtype"])
        raw = base64.b64decode(data["data"].encode("ascii"), validate=True)
        arr = np.frombuffer(raw, dtype=dtype).reshape(tuple(data["shape"])).copy()
        return arr[()] if tag == "scalar" else arr
    if tag == "bytes":
        return base64.b64decode(data["data"].encode("ascii"), validate=True)
    if tag == "tuple":
        return tuple(decode_value(v) for v in data["items"])
    if tag in ("dict", "ordered_dict"):
        from collections import OrderedDict

        pairs = [(_hashable(decode_value(k)), decode_value(v)) for k, v in data["items"]]
        return OrderedDict(pairs) if tag == "ordered_dict" else dict(pairs)
    raise ValueError(f"unknown metadata tag {tag!r}")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _dtype_from_name(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_sha256(arr: Any) -> str:
    """sha256 of an array's raw C-order bytes (dtype and shape are recorded beside it)."""
    return _sha256_bytes(np.ascontiguousarray(np.asarray(arr)).tobytes())


def block_count(size: int) -> int:
    """Blocks along an axis of ``size``: the largest power of two dividing it, <= MAX_BLOCKS."""
    n = 1
    while n < MAX_BLOCKS and size % (2 * n) == 0:
        n *= 2
    return n


def block_sha256s(arr: np.ndarray) -> dict[str, list[str]]:
    """``{axis: [sha256 of each block]}`` for every axis longer than 1 that splits into
    more than one block (block j of axis a: the slice [j*n/B, (j+1)*n/B) along a)."""
    out: dict[str, list[str]] = {}
    for axis, size in enumerate(arr.shape):
        nb = block_count(size)
        if size <= 1 or nb <= 1:
            continue
        step = size // nb
        out[str(axis)] = [
            array_sha256(np.take(arr, np.arange(j * step, (j + 1) * step), axis=axis)) for j in range(nb)
        ]
    return out


_file_sha256 = sha256_of_file


# --------------------------------------------------------------------------------------------
# Trees <-> flat names


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------
# Save


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns: ``contents`` (the dictionary's fields: ``config``,
    ``params``, ``buffers``, ``d_model``, ``row_mean``, ``row_norms``, ``row_token_ids``,
    ``metrics``, ``evaluation``, ``factorizer_block``, ``source_config`` — the keyword
    arguments of :class:`srp_jax.dictionary.Dictionary`), the source ``.pt`` layout (or None)
    and the decoded metadata (``format``, ``format_version``, ``arrays``, ``files``, ...).

    This module sits below :mod:`srp_jax.dictionary`: it stores and restores the fields;
    :func:`srp_jax.dictionary.load_dictionary` turns them into a ``Dictionary``."""

    contents: dict[str, Any]
    layout: dict[str, Any] | None
    metadata: dict[str, Any]
    path: Path
    verified: dict[str, int] = dataclasses.field(default_factory=dict)


def _checkpointer(local: bool):
    """An Orbax StandardCheckpointer; ``local``: used by this process alone (host arrays or
    arrays on its own devices) even in a multi-process run."""
    import orbax.checkpoint as ocp

    if not local or jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    )


def _host_arrays(dictionary: Any) -> dict[str, np.ndarray]:
    """Every array of the dictionary as host NumPy, under its tree name (dtypes kept)."""
    flat: dict[str, np.ndarray] = {}
    for name, value in _flatten({"params": dictionary.params}).items():
        flat[name] = np.asarray(value)
    for name, value in _flatten({"buffers": dictionary.buffers or {}}).items():
        flat[name] = np.asarray(value)
    for key in _ROW_KEYS:
        value = getattr(dictionary, key)
        if value is not None:
            arr = np.asarray(value)
            flat[f"rows/{key}"] = arr.astype(np.int64) if key == "row_token_ids" else arr
    for name, arr in flat.items():
        if arr.dtype == object or arr.dtype.kind not in "fiub" and arr.dtype != ml_dtypes.bfloat16:
            raise ShapeError(f"cannot save array {name!r} of dtype {arr.dtype}")
    return flat


def _check_dictionary(dictionary: Any) -> None:
    missing = [name for name in _DICTIONARY_FIELDS if not hasattr(dictionary, name)]
    if missing or not isinstance(getattr(dictionary, "config", None), FactorizerConfig):
        raise CheckpointError(f"save_dictionary needs a Dictionary, got {type(dictionary).__name__}")
    expected = F.expected_shapes(dictionary.config, dictionary.d_model)
    state = F.variables_to_state_dict(dictionary.params, dictionary.buffers, dictionary.config)
    for key, shape in expected.items():
        if tuple(np.shape(state[key])) != shape:
            raise ShapeError(f"dictionary {key!r} has shape {np.shape(state[key])}, expected {shape}")
    if dictionary.row_mean is not None and np.shape(dictionary.row_mean) != (dictionary.d_model,):
        raise ShapeError(f"row_mean has shape {np.shape(dictionary.row_mean)}, expected ({dictionary.d_model},)")
    for key in ("row_norms", "row_token_ids"):
        value = getattr(dictionary, key)
        if value is not None and np.ndim(value) != 1:
            raise ShapeError(f"{key} must be 1-D, got shape {np.shape(value)}")


def save_dictionary(
    dictionary: Any,
    path: str | os.PathLike,
    *,
    force: bool = False,
    layout: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``dictionary`` as an srp-jax checkpoint directory at ``path`` (atomically).

    Refuses an existing ``path`` unless ``force``. ``layout`` (used by ``convert``) records the
    top-level layout of the ``.pt`` the dictionary came from so the reverse conversion
    reproduces it. Returns the checkpoint path.
    """
    _check_dictionary(dictionary)
    path = Path(path).absolute()
    check_destination(path, force=force, replaceable=is_srp_checkpoint, what="an srp-jax checkpoint")
    flat = _host_arrays(dictionary)
    arrays_meta = {
        name: {"shape": list(arr.shape), "dtype": _dtype_name(arr.dtype), "sha256": array_sha256(arr)}
        for name, arr in flat.items()
    }
    for name, arr in flat.items():
        if name.split("/")[0] in ("params", "buffers") and (blocks := block_sha256s(arr)):
            arrays_meta[name]["blocks"] = blocks
    check_writable_parent(path, what="checkpoint")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a folder in {path.parent} ({exc.strerror or exc})") from None
    try:
        publish_permissions(tmp, directory=True)
        with _checkpointer(local=True) as ckptr:
            ckptr.save(tmp / ARRAYS_DIR, _unflatten(flat))
        files = {}
        for file in sorted(p for p in (tmp / ARRAYS_DIR).rglob("*") if p.is_file()):
            rel = file.relative_to(tmp).as_posix()
            files[rel] = {"size": file.stat().st_size, "sha256": _file_sha256(file)}
        try:
            from importlib.metadata import version

            written_by = f"srp-jax {version('srp-jax')}"
        except Exception:  # noqa: BLE001 - a bare checkout
            written_by = "srp-jax"
        content = {
            "d_model": int(dictionary.d_model),
            "architecture": dictionary.config.architecture,
            "factorizer": encode_value(
                dictionary.factorizer_block if dictionary.factorizer_block else dictionary.config.to_dict(),
                "factorizer",
            ),
            "factorizer_is_verbatim": bool(dictionary.factorizer_block),
            "evaluation": encode_value(dictionary.evaluation, "evaluation"),
            "metrics": encode_value(dictionary.metrics, "metrics"),
            "source_config": encode_value(dictionary.source_config, "config"),
            "layout": encode_value(dict(layout) if layout is not None else None, "layout"),
            "arrays": arrays_meta,
            "files": files,
            "written_by": written_by,
        }
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "content_sha256": _sha256_bytes(_canonical(content)),
            "content": content,
        }
        with open(tmp / METADATA_FILE, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clean_stale_siblings(path)  # what killed writes to this destination left behind
    return path


def check_destination(
    dst: str | os.PathLike,
    *,
    force: bool,
    sources: tuple[str | os.PathLike, ...] = (),
    replaceable: Any = None,
    what: str = "",
) -> None:
    """Refuse a destination that would lose data: one that exists (unless ``force``), one
    that is, holds or lies inside a source, and — even with ``force`` — an existing path
    that ``replaceable(path)`` does not recognise as ``what`` (e.g. an unrelated directory)."""
    dst = Path(dst)
    for node in (dst.parent, *dst.parent.parents):
        if node.exists() or node.is_symlink():
            if not node.is_dir():
                raise OutputError(f"{dst}: cannot write here: {node} is a file, not a directory")
            break
    target = dst.resolve()
    for src in sources:
        source = Path(src).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise CheckpointError(f"{dst}: the destination would overwrite the source {src}")
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise CheckpointError(f"{dst}: already exists (pass --force / force=True to replace it)")
    if replaceable is not None and not replaceable(dst):
        raise CheckpointError(f"{dst}: exists and is not {what}; refusing to replace it (remove it first)")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is swapped out first and removed after."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        return
    trash = dst.parent / f"{old_prefix(dst.name)}{uuid.uuid4().hex[:8]}"
    os.replace(dst, trash)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(trash, dst)
        raise
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Load


def is_srp_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding an srp-jax checkpoint (by its metadata file)."""
    path = Path(path)
    meta = path / METADATA_FILE
    if not meta.is_file():
        return False
    try:
        with open(meta, encoding="utf-8") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return FORMAT_NAME in head


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or its ``checkpoint/`` subdirectory for a training run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (an srp-jax checkpoint is a directory; .pt files go through convert)")
    if (path / METADATA_FILE).exists():
        return path
    if (path / RUN_SUBDIR / METADATA_FILE).exists():
        return path / RUN_SUBDIR
    raise CheckpointError(
        f"{path}: not an srp-jax checkpoint (no {METADATA_FILE} in it or in {RUN_SUBDIR}/)"
    )


def _read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path / METADATA_FILE
    try:
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{meta_path}: cannot read ({exc.strerror or exc})") from None
    if not raw:
        raise CheckpointError(f"{meta_path}: file is empty")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: damaged metadata (not valid JSON: {exc})") from None
    except RecursionError:
        raise CheckpointError(f"{meta_path}: damaged metadata (nested too deeply to read)") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{meta_path}: damaged metadata (top level is not an object)")
    if document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: not an srp-jax checkpoint (format {document.get('format')!r})")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {version!r} is not supported (this srp-jax reads {FORMAT_VERSION})"
        )
    content = document.get("content")
    if not isinstance(content, dict):
        raise CheckpointError(f"{meta_path}: damaged metadata (no 'content' object)")
    try:
        digest = _sha256_bytes(_canonical(content))
    except RecursionError:
        raise CheckpointError(f"{meta_path}: damaged metadata (nested too deeply to read)") from None
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: damaged metadata ({exc})") from None
    if digest != document.get("content_sha256"):
        raise CheckpointError(f"{meta_path}: metadata checksum mismatch (the file was modified or damaged)")
    for key in ("d_model", "architecture", "factorizer", "arrays", "files"):
        if key not in content:
            raise CheckpointError(f"{meta_path}: metadata lacks {key!r}")
    return content


def _file_problem(path: Path, rel: str, info: Mapping[str, Any]) -> str | None:
    file = path / rel
    if not file.is_file():
        return f"file {rel} is missing"
    size = file.stat().st_size
    if size != info["size"]:
        return f"file {rel} has {size} bytes, expected {info['size']} (truncated or damaged)"
    if _file_sha256(file) != info["sha256"]:
        return f"file {rel} fails its sha256 check (damaged)"
    return None


def _verify_files(path: Path, files: Mapping[str, Any]) -> None:
    """Check every file's size and sha256."""
    for rel, info in sorted(files.items()):
        if (problem := _file_problem(path, rel, info)) is not None:
            raise CheckpointError(f"{path}: {problem}")


def _verify_files_shared(path: Path, files: Mapping[str, Any]) -> None:
    """:func:`_verify_files` for a restore every process takes part in: process i checks
    files i, i+n, ... and the verdicts are exchanged (each file is read once in all)."""
    if jax.process_count() == 1:
        _verify_files(path, files)
        return
    from jax.experimental import multihost_utils

    items = sorted(files.items())
    me, n = jax.process_index(), jax.process_count()
    problem = next((p for rel, info in items[me::n] if (p := _file_problem(path, rel, info)) is not None), None)
    verdicts = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    if verdicts.any():
        bad = int(np.flatnonzero(verdicts)[0])
        raise CheckpointError(f"{path}: process {bad} found a damaged or missing file (see its log)")


def _shard_slices(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [sl.indices(n)[:2] if isinstance(sl, slice) else (int(sl), int(sl) + 1) for sl, n in zip(index, shape)]


def _verify_array(path: Path, name: str, value: Any, info: Mapping[str, Any], stats: dict[str, int]) -> None:
    """Check a restored array against its recorded checksums without gathering it: on a
    mesh, each distinct local shard split along one axis is checked block by block; a shard
    holding the whole array, or an array on one device, by its sha256."""
    shape = tuple(info["shape"])

    def whole(arr: np.ndarray) -> None:
        if array_sha256(arr) != info.get("sha256"):
            raise CheckpointError(f"{path}: array {name} fails its sha256 check (damaged)")
        stats["whole_arrays_hashed"] += 1

    single = not isinstance(value, jax.Array) or len(value.sharding.device_set) == 1
    if single:
        whole(np.asarray(value))
        return
    blocks = info.get("blocks") or {}
    unverified = False
    seen: set[tuple] = set()
    for shard in value.addressable_shards:
        bounds = _shard_slices(shard.index, shape)
        key = tuple(bounds)
        if key in seen:
            continue
        seen.add(key)
        partial = [a for a, (lo, hi) in enumerate(bounds) if (lo, hi) != (0, shape[a])]
        if not partial:
            whole(np.asarray(shard.data))
            continue
        axis = partial[0]
        hashes = blocks.get(str(axis))
        if len(partial) > 1 or not hashes:
            unverified = True
            continue
        lo, hi = bounds[axis]
        step = shape[axis] // len(hashes)
        data = np.asarray(shard.data)
        covered = 0
        for j in range(-(-lo // step), hi // step):
            part = np.take(data, np.arange(j * step - lo, (j + 1) * step - lo), axis=axis)
            if array_sha256(part) != hashes[j]:
                raise CheckpointError(f"{path}: array {name} block {j} (axis {axis}) fails its sha256 check (damaged)")
            stats["blocks_verified"] += 1
            covered += step
        unverified |= covered != hi - lo
    if unverified:
        if value.is_fully_addressable:  # one host: hash the whole array on the host
            whole(np.asarray(value))
        else:  # no block fits these shards: the file checksums above cover the bytes
            stats["unverified_arrays"] += 1


def _sharding_trees(sharding: Any, names: list[str]) -> dict[str, Any]:
    """Flat name -> Sharding for params/buffers from a Sharding, or a pytree of them.

    ``sharding`` may be one ``jax.sharding.Sharding`` for every array, a dict
    ``{"params": tree-or-Sharding, "buffers": tree-or-Sharding}`` or a pytree shaped like
    ``params`` (buffers then go on the default device).
    """
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if sharding is None:
        return {name: default for name in names}
    if isinstance(sharding, jax.sharding.Sharding):
        return {name: sharding for name in names}
    if not isinstance(sharding, Mapping):
        raise CheckpointError(f"sharding must be a jax.sharding.Sharding or a dict of them, got {type(sharding).__name__}")
    tree = dict(sharding) if ("params" in sharding or "buffers" in sharding) else {"params": sharding}
    out: dict[str, Any] = {}
    for name in names:
        group, *rest = name.split("/")
        node: Any = tree.get(group, default)
        for part in rest:
            if isinstance(node, jax.sharding.Sharding):
                break
            if not isinstance(node, Mapping) or part not in node:
                raise CheckpointError(f"sharding tree has no entry for {name!r}")
            node = node[part]
        if not isinstance(node, jax.sharding.Sharding):
            raise CheckpointError(f"sharding for {name!r} is a {type(node).__name__}, not a jax.sharding.Sharding")
        out[name] = node
    return out


def load_checkpoint(path: str | os.PathLike, *, sharding: Any = None) -> LoadedCheckpoint:
    """Verify and restore an srp-jax checkpoint (or a run directory's ``checkpoint/``).

    ``sharding`` places params and buffers: a ``jax.sharding.Mesh`` (laid out by
    :func:`srp_jax.sharding.param_rules`), one Sharding, or a tree of them (see
    :func:`_sharding_trees`); when it spans several processes, every process must call this
    (a collective restore)."""
    path = resolve_checkpoint_dir(path)
    content = _read_metadata(path)
    try:
        arrays_meta = {str(k): dict(v) for k, v in content["arrays"].items()}
        files = {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in content["files"].items()}
        d_model = int(content["d_model"])
        factorizer_block = decode_value(content["factorizer"])
        evaluation = decode_value(content.get("evaluation"))
        metrics = decode_value(content.get("metrics"))
        source_config = decode_value(content.get("source_config"))
        layout = decode_value(content.get("layout"))
        shapes = {name: tuple(int(s) for s in info["shape"]) for name, info in arrays_meta.items()}
        dtypes = {name: _dtype_from_name(str(info["dtype"])) for name, info in arrays_meta.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path / METADATA_FILE}: malformed metadata ({type(exc).__name__}: {exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path / METADATA_FILE}: malformed metadata (nested too deeply)") from None
    if not isinstance(factorizer_block, Mapping):
        raise CheckpointError(f"{path}: the factorizer block is not a dict")
    cfg = FactorizerConfig.from_dict(factorizer_block, strict=False)
    device_names = [n for n in arrays_meta if n.split("/")[0] in ("params", "buffers")]
    if isinstance(sharding, jax.sharding.Mesh):  # lay the arrays out by the partition rules
        from . import sharding as SH

        shapes_tree = _unflatten({n: jax.ShapeDtypeStruct(shapes[n], dtypes[n]) for n in device_names})
        sharding = SH.tree_shardings(sharding, shapes_tree, SH.param_rules(cfg), what=f"{path}: ")
    shardings = _sharding_trees(sharding, device_names)
    local = all(s.is_fully_addressable for s in shardings.values())
    if local:
        _verify_files(path, files)
    else:
        _verify_files_shared(path, files)
    target: dict[str, Any] = {}
    for name in arrays_meta:
        if name in shardings:
            target[name] = jax.ShapeDtypeStruct(shapes[name], dtypes[name], sharding=shardings[name])
        else:
            target[name] = np.empty(shapes[name], dtypes[name])
    try:
        with _checkpointer(local=local) as ckptr:
            restored = ckptr.restore((path / ARRAYS_DIR).absolute(), _unflatten(target))
    except SrpError:
        raise
    except Exception as exc:  # noqa: BLE001 - Orbax/tensorstore raise many types; report one line
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: the array store cannot be restored ({type(exc).__name__}: {msg})") from None
    flat = _flatten(restored)
    if set(flat) != set(arrays_meta):
        raise CheckpointError(f"{path}: restored arrays {sorted(flat)} differ from the recorded {sorted(arrays_meta)}")
    stats = {"whole_arrays_hashed": 0, "blocks_verified": 0, "unverified_arrays": 0}
    for name, value in flat.items():
        got_shape, got_dtype = tuple(np.shape(value)), np.dtype(value.dtype)
        if got_shape != shapes[name] or got_dtype != dtypes[name]:
            raise CheckpointError(
                f"{path}: array {name} restored as {got_dtype}{list(got_shape)}, recorded {dtypes[name]}{list(shapes[name])}"
            )
        _verify_array(path, name, value, arrays_meta[name], stats)
    params = restored.get("params", {})
    buffers = restored.get("buffers", {})
    rows = restored.get("rows", {})
    expected = F.expected_shapes(cfg, d_model)
    state = F.variables_to_state_dict(params, buffers, cfg) if _has_all(params, buffers, cfg) else None
    if state is None:
        raise CheckpointError(f"{path}: the arrays do not match a {cfg.architecture} factorizer")
    for key, shape in expected.items():
        if tuple(np.shape(state[key])) != shape:
            raise ShapeError(f"{path}: {key!r} has shape {np.shape(state[key])}, expected {shape} from the config")

    def _row(key: str) -> Any:
        if key not in rows:
            return None
        arr = np.asarray(rows[key])
        if key == "row_token_ids":
            return arr
        return jnp.asarray(arr) if _dtype_name(arr.dtype) in _JAX_FLOATS else arr

    contents = dict(
        config=cfg,
        params=params,
        buffers=buffers,
        d_model=d_model,
        row_mean=_row("row_mean"),
        row_norms=_row("row_norms"),
        row_token_ids=_row("row_token_ids"),
        metrics=dict(metrics) if isinstance(metrics, Mapping) else None,
        evaluation=dict(evaluation) if isinstance(evaluation, Mapping) else None,
        factorizer_block=dict(factorizer_block) if content.get("factorizer_is_verbatim", True) else None,
        source_config=dict(source_config) if isinstance(source_config, Mapping) else None,
    )
    return LoadedCheckpoint(contents=contents, layout=layout, metadata=content, path=path, verified=stats)


def _has_all(params: Mapping[str, Any], buffers: Mapping[str, Any], cfg: FactorizerConfig) -> bool:
    try:
        F.variables_to_state_dict(params, buffers, cfg)
    except (KeyError, TypeError):
        return False
    return True


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "LoadedCheckpoint",
    "save_dictionary",
    "load_checkpoint",
    "is_srp_checkpoint",
    "resolve_checkpoint_dir",
    "array_sha256",
    "encode_value",
    "decode_value",
]
