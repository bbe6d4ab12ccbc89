"""Training data: readout payloads (validated: no NaN/Inf rows, no empty hidden set), the
synthetic fallback (only when a config without a data path asks for it), hidden splits, row subsets,
top-target statistics, row-sampling weights and the ``PrismDataset``.

Host-side NumPy throughout (this runs once per run); the one matmul that ranks logits runs in
JAX at ``precision=HIGHEST``. Seeds: the hidden split uses ``data_seed + 11`` and the row
subset ``data_seed + 23`` (the reference's offsets) through private NumPy generators, so the
same ``data_seed`` gives the same split in every cell of a sweep. Values differ from the torch
reference's (different RNG); the recipe and the distributions are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._arrays import to_device, to_numpy
from ._lazy import read_pt
from .compile import compiled
from .config import DataConfig, RunConfig, parse_row_sampling, validate_sampling_mode
from ._validate import expand_path
from .errors import CheckpointError, ConfigError, DependencyError, MissingKeyError, NonFiniteError, ShapeError
from .readout import Readout, preprocess_rows

HIGHEST = jax.lax.Precision.HIGHEST
PAD_NORM_EPS = 1e-6
HIDDEN_SEED_OFFSET = 11
ROW_SUBSET_SEED_OFFSET = 23
TOP_TARGETS_N = 8
PAYLOAD_SUFFIXES = (".pt", ".pth", ".npz", ".npy", ".safetensors")

# --------------------------------------------------------------------------------------------
# Payloads


def read_payload(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a readout payload: ``{"W_U": (V, d) f32, "h_LN": (..., d) f32, "token_mask": (V,) bool?}``.

    Accepts ``.npz`` / ``.safetensors`` (keys ``W_U_orig`` or ``W_U``, ``h_LN``, optional
    ``token_mask``), a folder of ``.npy`` files named after those keys (``W_U.npy``,
    ``h_LN.npy``, ...; ``path`` the folder or any ``.npy`` in it; pickles refused) and the
    reference's ``.pt`` payloads (read with ``weights_only=True`` through the ``convert``
    extra). ``W_U_orig`` wins over ``W_U``, as in the reference.
    """
    path = Path(path)
    if path.is_dir():
        return payload_from_mapping(_read_npy_folder(path), source=str(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such payload file")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        raw: Mapping[str, Any] = read_pt(path)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {key: z[key] for key in z.files}
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable .npz payload ({type(exc).__name__}: {exc})") from None
    elif suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
                raise DependencyError(f"reading {path} needs the 'safetensors' package: pip install safetensors") from None
        try:
            raw = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable .safetensors payload ({type(exc).__name__}: {exc})") from None
    elif suffix == ".npy":
        return payload_from_mapping(_read_npy_folder(path.parent), source=str(path.parent))
    else:
        raise CheckpointError(f"{path}: unknown payload type {suffix!r} (expected one of {', '.join(PAYLOAD_SUFFIXES)})")
    return payload_from_mapping(raw, source=str(path))


_NPY_KEYS = ("W_U_orig", "W_U", "h_LN", "token_mask")


def _read_npy_folder(folder: Path) -> dict[str, np.ndarray]:
    """The payload arrays saved one per ``<key>.npy`` file in ``folder`` (no pickles)."""
    raw: dict[str, np.ndarray] = {}
    for key in _NPY_KEYS:
        file = folder / f"{key}.npy"
        if not file.is_file():
            continue
        try:
            raw[key] = np.load(file, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{file}: not a plain .npy array ({type(exc).__name__}: {exc})") from None
    if not raw:
        raise CheckpointError(
            f"{folder}: no payload arrays here (a .npy payload is a folder of W_U.npy or W_U_orig.npy, "
            "h_LN.npy and optionally token_mask.npy)"
        )
    return raw


def payload_from_mapping(raw: Mapping[str, Any], *, source: str = "payload") -> dict[str, np.ndarray]:
    """Normalise a payload mapping: pick ``W_U_orig`` / ``W_U``, cast to float32, check dims."""
    W = raw.get("W_U_orig")
    if W is None:
        W = raw.get("W_U")
    h = raw.get("h_LN")
    if W is None or h is None:
        raise MissingKeyError(f"{source} must contain W_U_orig (or W_U) and h_LN; found keys: {sorted(raw)}")
    W_np = _numeric(W, f"{source}: W_U")
    h_np = _numeric(h, f"{source}: h_LN")
    if W_np.ndim != 2:
        raise ShapeError(f"{source}: W_U must be 2-D (vocab, d_model), got shape {W_np.shape}")
    if W_np.shape[0] == 0 or W_np.shape[1] == 0:
        raise ShapeError(f"{source}: W_U has shape {W_np.shape}; it needs at least one row and d_model >= 1")
    if h_np.ndim < 2:
        raise ShapeError(f"{source}: h_LN must have rank >= 2 (..., d_model), got shape {h_np.shape}")
    if h_np.shape[-1] != W_np.shape[-1]:
        raise ShapeError(f"{source}: hidden dim {h_np.shape[-1]} does not match W_U dim {W_np.shape[-1]}")
    _check_finite_rows(W_np, f"{source}: W_U")
    flat = h_np.reshape(-1, h_np.shape[-1])
    if flat.shape[0] == 0:
        raise ShapeError(f"{source}: h_LN holds no hidden states (shape {h_np.shape})")
    _check_finite_rows(h_np, f"{source}: h_LN")
    if not np.any(np.linalg.norm(flat.astype(np.float64), axis=1) > PAD_NORM_EPS):
        raise ShapeError(f"{source}: every one of the {flat.shape[0]} hidden states in h_LN is padding (norm <= {PAD_NORM_EPS:g})")
    out = {"W_U": W_np, "h_LN": h_np}
    if raw.get("token_mask") is not None:
        mask = to_numpy(raw["token_mask"], name=f"{source}[token_mask]").astype(bool).reshape(-1)
        if mask.shape[0] != W_np.shape[0]:
            raise ShapeError(f"{source}: token_mask length {mask.shape[0]} does not match vocab {W_np.shape[0]}")
        out["token_mask"] = mask
    return out


def _numeric(value: Any, where: str) -> np.ndarray:
    """A payload array as float32; strings, objects and other non-numbers are refused by name."""
    arr = to_numpy(value, name=where)
    if arr.dtype.kind not in "fiub" and str(arr.dtype) != "bfloat16":
        raise ShapeError(f"{where} must be a numeric array, got dtype {arr.dtype} (shape {arr.shape})")
    return arr.astype(np.float32)


def _check_finite_rows(arr: np.ndarray, where: str) -> None:
    """Refuse NaN/Inf, naming the first bad row (its index in the array's leading axes)."""
    finite = np.isfinite(arr).all(axis=-1)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    first = tuple(int(i) for i in bad[0])
    row = first[0] if len(first) == 1 else first
    value = arr[first][~np.isfinite(arr[first])][0]
    raise NonFiniteError(
        f"{where} row {row} holds a non-finite value ({value}); {bad.shape[0]} row(s) in all are not finite"
    )


def payload_fingerprint(payload: Mapping[str, np.ndarray]) -> str:
    """``sha256:<hex>`` of a normalised payload (as :func:`payload_from_mapping` returns): the
    name, dtype, shape and bytes of ``W_U``, ``h_LN`` and ``token_mask`` (when present), so one
    data set has one fingerprint whatever file format carried it. A run directory records it."""
    digest = hashlib.sha256()
    for key in ("W_U", "h_LN", "token_mask"):
        if key not in payload:
            continue
        arr = np.ascontiguousarray(payload[key])
        digest.update(f"{key}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        digest.update(arr.reshape(-1).view(np.uint8) if arr.size else b"")
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Synthetic fallback


def make_synthetic_data(
    seed: int, vocab_size: int = 1024, d_model: int = 128, layers: int = 8, positions: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's synthetic readout, drawn from a NumPy generator seeded with ``seed``.

    latent (96, d) ~ N(0,1); codes (V, 96) = ReLU(N(0,1)) with entries below their 0.95
    quantile zeroed; W = codes @ latent / sqrt(96) + 0.05 N(0,1);
    h (layers, positions, d) = N(0,1) + 0.15 sin(linspace(0, 6.28, layers)) per layer.
    Returns float32 ``(W_U (V, d), h (layers, positions, d))``.
    """
    rng = np.random.default_rng(int(seed))
    latent = rng.standard_normal((96, d_model), dtype=np.float32)
    codes = np.maximum(rng.standard_normal((vocab_size, 96), dtype=np.float32), 0.0)
    codes[codes < np.quantile(codes, 0.95)] = 0.0
    W = codes @ latent / np.float32(96**0.5)
    W = W + np.float32(0.05) * rng.standard_normal((vocab_size, d_model), dtype=np.float32)
    h = rng.standard_normal((layers, positions, d_model), dtype=np.float32)
    h = h + np.float32(0.15) * np.sin(np.linspace(0.0, 6.28, layers, dtype=np.float32))[:, None, None]
    return W.astype(np.float32), h.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Hidden states


def drop_padding(hidden: np.ndarray) -> np.ndarray:
    """Flatten to (N, d) and drop rows with norm <= 1e-6 (the extractor's zeroed padding),
    unless that would drop every row."""
    flat = np.asarray(hidden, np.float32).reshape(-1, hidden.shape[-1])
    keep = np.linalg.norm(flat.astype(np.float64), axis=1) > PAD_NORM_EPS  # float64: no overflow on huge rows
    if keep.any() and not keep.all():
        flat = flat[keep]
    return flat


def split_hidden(
    hidden: np.ndarray, max_hidden: int, val_hidden: int, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Seeded split of (N, d) hidden states into (train, val, val_overlaps_train).

    A random permutation (``seed``; always applied) orders the pool; train = its first
    ``max_hidden`` rows, val = the next ``val_hidden``. An empty val falls back to the first
    min(64, n) train rows and flags the overlap.
    """
    perm = np.random.default_rng(int(seed)).permutation(hidden.shape[0])
    sample = hidden[perm[: max_hidden + val_hidden]]
    train = np.ascontiguousarray(sample[:max_hidden])
    val = np.ascontiguousarray(sample[max_hidden : max_hidden + val_hidden])
    overlaps = False
    if val.shape[0] == 0:
        val = train[: min(64, train.shape[0])].copy()
        overlaps = True
    return train, val, overlaps


# --------------------------------------------------------------------------------------------
# Top targets and row subsets


@compiled(static_argnums=(2,))
def _top_ids(h: jax.Array, W: jax.Array, top_n: int) -> jax.Array:
    logits = jnp.matmul(h, W.T, precision=HIGHEST)
    return jax.lax.top_k(logits, top_n)[1]


def compute_top_targets(
    W: Any, hidden: Any, top_n: int = TOP_TARGETS_N, hidden_batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``(top_targets (N, n) int64, top_counts (V,) int64)``: for each hidden state the row
    positions of its ``n = min(top_n, V)`` largest logits h @ W^T, and how often each row appears
    in those lists. Ties go to the lower row."""
    W_j = to_device(W, np.float32)
    H = np.asarray(hidden, np.float32)
    V = W_j.shape[0]
    n = min(int(top_n), V)
    parts = [
        np.asarray(_top_ids(jnp.asarray(H[s : s + hidden_batch]), W_j, n))
        for s in range(0, H.shape[0], hidden_batch)
    ]
    targets = np.concatenate(parts, axis=0).astype(np.int64) if parts else np.zeros((0, n), np.int64)
    counts = np.bincount(targets.reshape(-1), minlength=V).astype(np.int64)
    return targets, counts


def choose_row_subset(
    W: Any, hidden: Any, max_rows: int | None, seed: int, token_mask: Any = None
) -> np.ndarray:
    """Vocabulary ids (ascending unless topped up) of the rows to train on.

    ``max_rows`` None or >= the allowed rows: every allowed id in ascending order. Otherwise
    half the budget goes to the most frequent top-5 targets of the first 256 hidden states
    (count > 0, allowed only), the rest is filled from a seeded permutation of allowed ids.
    """
    W_np = np.asarray(W, np.float32)
    V = W_np.shape[0]
    allowed = np.ones(V, bool) if token_mask is None else np.asarray(token_mask, bool).reshape(-1)
    if allowed.shape[0] != V:
        raise ShapeError(f"token_mask length {allowed.shape[0]} does not match vocab {V}")
    allowed_idx = np.flatnonzero(allowed).astype(np.int64)
    if max_rows is None or max_rows >= allowed_idx.shape[0]:
        return allowed_idx
    keep = int(max_rows)
    H = np.asarray(hidden, np.float32)[:256]
    _, counts = compute_top_targets(W_np, H, top_n=5)
    counts = np.where(allowed, counts, 0)
    ranked = np.argsort(-counts, kind="stable")
    active = ranked[counts[ranked] > 0]
    take_active = active[: min(active.shape[0], keep // 2)]
    perm = allowed_idx[np.random.default_rng(int(seed)).permutation(allowed_idx.shape[0])]
    free = np.ones(V, bool)
    free[take_active] = False
    fill = perm[free[perm]][: keep - take_active.shape[0]]
    row_ids = np.unique(np.concatenate([take_active, fill]))
    if row_ids.shape[0] < keep:
        remaining = perm[~np.isin(perm, row_ids)][: keep - row_ids.shape[0]]
        row_ids = np.concatenate([row_ids, remaining])
    return row_ids[:keep].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Row sampling


def row_sampling_weights(dataset: Any, mode: str | None) -> np.ndarray:
    """Normalised sampling probabilities (V,) float64 over the kept rows.

    ``dataset`` needs ``top_counts`` (V,) and ``top_targets`` (N, n) (a ``PrismDataset`` or
    any object/mapping with those). Frequencies are top-8 appearance counts, floored at 1.
    The mode grammar is :func:`srp_jax.config.parse_row_sampling`.
    """
    kind, param = parse_row_sampling(mode)
    get = dataset.get if isinstance(dataset, Mapping) else lambda k: getattr(dataset, k)
    counts = np.asarray(get("top_counts"), np.float64)
    V = counts.shape[0]
    freq = np.maximum(counts, 1.0)
    if kind == "uniform":
        w = np.ones(V)
    elif kind == "frequency_pow":
        w = freq if param == 1.0 else freq**param
    elif kind == "hybrid":
        w = param * (freq / freq.sum()) + (1.0 - param) * np.full(V, 1.0 / V)
    else:  # top_sqrt: sqrt of how often a row is among the top-n targets
        targets = np.asarray(get("top_targets"), np.int64)
        cols = 1 if param == 1 else min(param, targets.shape[1] if targets.ndim == 2 else 1)
        hits = np.bincount(targets[:, :cols].reshape(-1), minlength=V).astype(np.float64)
        w = np.sqrt(np.maximum(hits, 1.0))
    return w / w.sum()


# --------------------------------------------------------------------------------------------
# The dataset


@dataclasses.dataclass
class PrismDataset:
    """Everything training and evaluation read.

    ``rows`` the kept readout rows as a :class:`~srp_jax.readout.Readout` (the one carrier of
    the row statistics; ``readout()`` returns it), ``hidden_train`` (N_t, d); ``hidden_val``
    (N_v, d); ``top_targets`` (N_t, 8) int64 row positions; ``top_counts`` (V,) int64;
    ``source_path``; ``used_fallback``; ``val_overlaps_train``; ``token_labels``
    (placeholders ``tok_<id>``); ``h_LN_grid`` the raw hidden payload; ``fingerprint`` the
    payload's :func:`payload_fingerprint`.

    The reference's field names ``W_U`` (V, d), ``rows_normalized`` (V, d), ``row_mean``
    (d,), ``row_norms`` (V,) and ``row_token_ids`` (V,) read through to ``rows``.
    """

    rows: Readout
    hidden_train: np.ndarray
    hidden_val: np.ndarray
    top_targets: np.ndarray
    top_counts: np.ndarray
    source_path: str
    used_fallback: bool
    val_overlaps_train: bool = False
    token_labels: list[str] = dataclasses.field(default_factory=list)
    h_LN_grid: np.ndarray | None = None
    fingerprint: str | None = None

    W_U = property(lambda self: self.rows.W_U, doc="(V, d) the kept raw rows")
    rows_normalized = property(lambda self: self.rows.rows_normalized, doc="(V, d) centred, unit-norm rows")
    row_mean = property(lambda self: self.rows.row_mean, doc="(d,) the mean of the kept rows")
    row_norms = property(lambda self: self.rows.row_norms, doc="(V,) norms of the centred rows (floor 1e-8)")
    row_token_ids = property(lambda self: np.asarray(self.rows.row_token_ids, np.int64), doc="(V,) vocabulary ids")

    @property
    def vocab_size(self) -> int:
        return self.rows.vocab_size

    @property
    def d_model(self) -> int:
        return self.rows.d_model

    def readout(self, softcap: float | None = None) -> Readout:
        """This dataset's rows (no recomputation), optionally with a logit softcap."""
        return self.rows if softcap is None else self.rows.with_softcap(softcap)


def _data_block(config: Any) -> DataConfig:
    if isinstance(config, RunConfig):
        return config.data
    if isinstance(config, DataConfig):
        return config
    if isinstance(config, Mapping):
        block = config.get("data", config) if "data" in config or not config else config
        if block is config and any(k in config for k in ("factorizer", "training", "run")):
            block = {}
        return DataConfig.from_dict(block)
    raise ConfigError(f"expected a run config or a data block, got {type(config).__name__}")


def resolve_data_path(path: str | None) -> Path | None:
    """``data.path`` with ``${VAR}`` / ``~`` expanded, or None when no path is configured; a
    variable that is not set is a :class:`ConfigError` naming it."""
    if not path:
        return None
    return Path(expand_path("data.path", path))


@dataclasses.dataclass
class LoadedPayload:
    """A normalised payload (``W_U``, ``h_LN``, optional ``token_mask``) with where it came
    from: ``source`` (the path, ``"synthetic"`` or ``"payload"``), ``used_fallback`` and
    ``fingerprint`` (:func:`payload_fingerprint`); ``files`` the payload files read."""

    arrays: dict[str, np.ndarray]
    source: str
    used_fallback: bool
    fingerprint: str
    files: tuple[Path, ...] = ()


def load_payload(config: Any, seed: int = 0, *, payload: Mapping[str, Any] | None = None) -> LoadedPayload:
    """The payload a run config names, validated (no NaN/Inf, no empty hidden set), before any
    compute. ``payload`` (a mapping) wins; else ``data.path``, which must exist (an explicit
    path never falls back); else, with no path, the synthetic readout when
    ``data.fallback: synthetic`` and a :class:`ConfigError` when ``data.fallback: error``."""
    data = _data_block(config)
    data_seed = int(seed if data.data_seed is None else data.data_seed)
    if payload is not None:
        loaded = payload_from_mapping(payload, source="payload")
        return LoadedPayload(loaded, "payload", False, payload_fingerprint(loaded))
    path = data_source(data)
    if path is not None:
        loaded = read_payload(path)
        files = tuple(sorted(payload_files(path)))
        return LoadedPayload(loaded, str(path), False, payload_fingerprint(loaded), files)
    W, h = make_synthetic_data(seed=data_seed)
    loaded = payload_from_mapping({"W_U": W, "h_LN": h}, source="synthetic data")
    return LoadedPayload(loaded, "synthetic", True, payload_fingerprint(loaded))


def data_source(config: Any) -> Path | None:
    """The payload path a config trains on (checked to exist), or None for the synthetic
    readout (only when there is no ``data.path`` and ``data.fallback: synthetic``). Reads
    nothing; raises what :func:`load_payload` would for a missing source."""
    data = _data_block(config)
    path = resolve_data_path(data.path)
    if path is not None:
        if not (path.is_file() or path.is_dir()):  # a folder: .npy payload
            raise CheckpointError(
                f"data.path {str(path)!r}: no such payload file or folder (an explicit data path never falls "
                "back to synthetic data; fix data.path / --data-path)"
            )
        return path
    if data.fallback == "synthetic":
        return None
    raise ConfigError(
        "no data.path given and data.fallback is 'error': set data.path / --data-path to a readout payload "
        "(data.fallback: synthetic trains on the built-in synthetic readout instead)"
    )


def payload_files(path: Path) -> list[Path]:
    """The absolute paths of the files a payload ``path`` (a file, a ``.npy`` or its folder) reads."""
    if path.is_file() and path.suffix.lower() != ".npy":
        return [path.absolute()]
    folder = path if path.is_dir() else path.parent
    return [(folder / f"{key}.npy").absolute() for key in _NPY_KEYS if (folder / f"{key}.npy").is_file()]


def build_prism_dataset(config: Any, loaded: LoadedPayload, seed: int = 0) -> PrismDataset:
    """Split, subset and rank a :class:`LoadedPayload` into the :class:`PrismDataset` training
    reads (``seed`` the legacy seed ``data.data_seed`` defaults to)."""
    data = _data_block(config)
    data_seed = int(seed if data.data_seed is None else data.data_seed)
    W_full, h_grid = loaded.arrays["W_U"], loaded.arrays["h_LN"]
    mask = loaded.arrays.get("token_mask") if data.apply_token_mask else None
    hidden = drop_padding(h_grid)
    hidden_train, hidden_val, overlaps = split_hidden(
        hidden, data.max_hidden, data.val_hidden, data_seed + HIDDEN_SEED_OFFSET
    )
    row_ids = choose_row_subset(W_full, hidden_train, data.max_rows, data_seed + ROW_SUBSET_SEED_OFFSET, mask)
    W = np.ascontiguousarray(W_full[row_ids])
    row_mean, row_norms, rows_normalized = preprocess_rows(W)
    rows = Readout(
        W_U=to_device(W), row_mean=row_mean, row_norms=row_norms, rows_normalized=rows_normalized,
        row_token_ids=row_ids.astype(np.int64),
    )
    top_targets, top_counts = compute_top_targets(W, hidden_train, top_n=TOP_TARGETS_N)
    return PrismDataset(
        rows=rows,
        hidden_train=hidden_train,
        hidden_val=hidden_val,
        top_targets=top_targets,
        top_counts=top_counts,
        source_path=loaded.source,
        used_fallback=loaded.used_fallback,
        val_overlaps_train=overlaps,
        token_labels=[f"tok_{int(i)}" for i in row_ids],
        h_LN_grid=h_grid,
        fingerprint=loaded.fingerprint,
    )


def load_prism_dataset(config: Any, seed: int = 0, *, payload: Mapping[str, Any] | None = None) -> PrismDataset:
    """Build the training dataset from a run config (``RunConfig``, a config mapping or a
    ``data`` block) and the legacy ``seed`` (``data.data_seed`` defaults to it):
    :func:`load_payload` then :func:`build_prism_dataset`."""
    return build_prism_dataset(config, load_payload(config, seed, payload=payload), seed)


__all__ = [
    "PrismDataset",
    "read_payload",
    "payload_from_mapping",
    "make_synthetic_data",
    "drop_padding",
    "split_hidden",
    "compute_top_targets",
    "choose_row_subset",
    "validate_sampling_mode",
    "row_sampling_weights",
    "resolve_data_path",
    "payload_fingerprint",
    "LoadedPayload",
    "load_payload",
    "data_source",
    "payload_files",
    "build_prism_dataset",
    "load_prism_dataset",
]
