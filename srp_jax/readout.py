"""Row preprocessing and the ``Readout``: one model's unembedding, prepared once.

The one preprocessing definition of the project (training, evaluation, decomposition and
conversion all use it): center the rows of ``W_U`` by a row mean ``mu`` and divide each by its
norm, clamped below at 1e-8 (the same floor training used)::

    a_v = max(||w_v - mu||_2, 1e-8),    x_v = (w_v - mu) / a_v
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._arrays import as_float_array, as_index_array, check_last_dim, to_numpy
from ._display import html_table, shape_text
from ._pytree import pytree_dataclass, static_field
from .compile import compiled
from .errors import ConfigError, ShapeError

ROW_NORM_EPS = 1e-8


def center_normalize(rows: jax.Array, row_mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The one centre-and-normalize (pure, traceable): ``(norms (...,), normalized (..., d))``
    of rows (..., d) about ``row_mean`` (d,), norms clamped below at 1e-8."""
    centered = rows - row_mean
    norms = jnp.maximum(jnp.sqrt(jnp.sum(centered * centered, axis=-1)), ROW_NORM_EPS)
    return norms, centered / norms[..., None]


def denormalize_rows(x_hat: jax.Array, row_mean: jax.Array, row_norms: jax.Array) -> jax.Array:
    """Raw-space rows ``mu + a * x_hat`` (..., d) of normalized-space rows x_hat (..., d) with
    norms a (...,): the inverse of :func:`center_normalize`, used for every reconstructed
    ``W_U`` row (decomposition residuals, evaluation logits, the prism penalty)."""
    return row_mean + row_norms[..., None] * x_hat


_center_normalize = compiled(center_normalize)


def center_normalize_rows(rows: Any, row_mean: Any) -> tuple[jax.Array, jax.Array]:
    """``(norms (V,), normalized (V, d))`` of rows (V, d) (or one row (d,)) about ``row_mean`` (d,).

    Note the order: norms first (the reference's ``center_normalize_rows``).
    """
    rows_a = as_float_array(rows, name="rows", ndim=(1, 2))
    mean_a = as_float_array(row_mean, name="row_mean", ndim=1)
    check_last_dim("rows", rows_a, mean_a.shape[0], "row_mean's length")
    return _center_normalize(rows_a, mean_a)


def preprocess_rows(W_U: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(row_mean (d,), row_norms (V,), rows_normalized (V, d))`` with the full-row mean.

    Note the order: mean first (the reference's ``preprocess_rows``).
    """
    W = as_float_array(W_U, name="W_U", ndim=2)
    if W.shape[0] == 0:
        raise ShapeError("W_U has no rows")
    row_mean = jnp.mean(W, axis=0)
    norms, normalized = _center_normalize(W, row_mean)
    return row_mean, norms, normalized


def _mask_ids(token_mask: Any, vocab: int) -> np.ndarray:
    mask = to_numpy(token_mask, name="token_mask")
    if mask.ndim != 1 or mask.shape[0] != vocab:
        raise ShapeError(f"token_mask must have shape ({vocab},) to match W_U, got {mask.shape}")
    ids = np.flatnonzero(mask.astype(bool))
    if ids.size == 0:
        raise ShapeError("token_mask keeps no rows")
    return ids


def resolve_row_mean(W: Any, token_mask: Any = None, ckpt: Any = None) -> jax.Array:
    """The centering mean for evaluation/decomposition, in the reference's order of preference:

    1. the checkpoint's stored ``row_mean`` (``ckpt`` a checkpoint dict or a ``Dictionary``);
    2. else the mean over the ``token_mask``-kept rows of ``W``;
    3. else the mean over all rows of ``W``.
    """
    W_a = as_float_array(W, name="W_U", ndim=2)
    stored = None
    if ckpt is not None:
        stored = ckpt.get("row_mean") if isinstance(ckpt, Mapping) else getattr(ckpt, "row_mean", None)
    if stored is not None:
        mean = as_float_array(stored, name="checkpoint row_mean", ndim=1)
        check_last_dim("checkpoint row_mean", mean, W_a.shape[1], "W_U's d_model")
        return mean
    if token_mask is not None:
        return jnp.mean(W_a[_mask_ids(token_mask, W_a.shape[0])], axis=0)
    return jnp.mean(W_a, axis=0)


@pytree_dataclass
class Readout:
    """One model's readout rows, prepared once for every consumer (a registered pytree).

    ``W_U`` (V, d) the kept rows (raw), ``row_mean`` (d,), ``row_norms`` (V,),
    ``rows_normalized`` (V, d), ``row_token_ids`` (V,) integer vocabulary ids of the kept rows
    (row v of every array is token ``row_token_ids[v]``); ``softcap`` (static) the model's
    post-readout logit cap (Gemma: 30.0) or None.

    Training data, the train step, evaluation, decomposition and labelling all take a Readout
    instead of re-deriving the statistics. Arrays are leaves (a Readout passes through
    ``jit``, ``vmap`` and ``device_put``; on a mesh its rows can be sharded); ``softcap`` is
    static. ``row_token_ids`` is a leaf too; host-side lookups read it with NumPy.
    """

    W_U: jax.Array
    row_mean: jax.Array
    row_norms: jax.Array
    rows_normalized: jax.Array
    row_token_ids: Any
    softcap: float | None = static_field(default=None)

    @property
    def vocab_size(self) -> int:
        return int(self.W_U.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.W_U.shape[1])

    @classmethod
    def from_weights(
        cls,
        W_U: Any,
        *,
        row_mean: Any = None,
        token_mask: Any = None,
        row_token_ids: Any = None,
        softcap: float | None = None,
    ) -> Readout:
        """Prepare ``W_U`` (V_full, d).

        Rows kept: ``row_token_ids`` if given, else the ``token_mask`` rows, else all (in
        ascending id order). ``row_mean``: given (e.g. a checkpoint's), else the mean of the
        kept rows (the training definition).
        """
        W = as_float_array(W_U, name="W_U", ndim=2)
        V = W.shape[0]
        if row_token_ids is not None:
            ids = as_index_array(row_token_ids, name="row_token_ids", ndim=1, upper=V)
        elif token_mask is not None:
            ids = _mask_ids(token_mask, V)
        else:
            ids = np.arange(V, dtype=np.int64)
        kept = W if ids.shape[0] == V and np.array_equal(ids, np.arange(V)) else W[jnp.asarray(ids)]
        if row_mean is None:
            mean = jnp.mean(kept, axis=0)
        else:
            mean = as_float_array(row_mean, name="row_mean", ndim=1)
            check_last_dim("row_mean", mean, W.shape[1], "W_U's d_model")
        norms, normalized = _center_normalize(kept, mean)
        return cls(kept, mean, norms, normalized, ids.astype(np.int64), _softcap(softcap))

    @classmethod
    def for_dictionary(
        cls,
        W_U: Any,
        dictionary: Any,
        *,
        token_mask: Any = None,
        softcap: float | None = None,
        rows: str = "trained",
    ) -> Readout:
        """Prepare ``W_U`` the way ``dictionary`` was trained: its stored ``row_mean``
        (``resolve_row_mean`` order), and which rows to keep:

        ``rows="trained"`` (default; what evaluation wants) the dictionary's
        ``row_token_ids`` when it has them, else the ``token_mask`` rows, else all;
        ``rows="all"`` every vocabulary row, so any token can be decomposed.
        """
        if rows not in ("trained", "all"):
            raise ConfigError(f"rows must be 'trained' or 'all', got {rows!r}")
        W = as_float_array(W_U, name="W_U", ndim=2)
        check_last_dim("W_U", W, dictionary.d_model)
        mean = resolve_row_mean(W, token_mask=token_mask, ckpt=dictionary)
        ids = _trained_ids(W, dictionary)
        if rows == "all":
            return cls.from_weights(W, row_mean=mean, softcap=softcap)
        return cls.from_weights(W, row_mean=mean, row_token_ids=ids, token_mask=None if ids is not None else token_mask, softcap=softcap)

    def positions(self, token_ids: Any) -> np.ndarray:
        """Row positions of vocabulary ``token_ids`` (ShapeError for an id this readout lacks)."""
        ids = as_index_array(token_ids, name="token_ids")
        if np.array_equal(self.row_token_ids, np.arange(self.vocab_size)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise ShapeError(f"token id out of range [0, {self.vocab_size})")
            return ids
        order = np.argsort(self.row_token_ids)
        pos = np.searchsorted(self.row_token_ids, ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        found = order[pos]
        missing = ids[self.row_token_ids[found] != ids]
        if missing.size:
            raise ShapeError(
                f"token id(s) {missing[:5].tolist()} are not among this readout's rows "
                "(Readout.for_dictionary(W_U, model, rows='all') keeps every vocabulary row)"
            )
        return found

    # ---- views
    def take(self, positions: Any) -> Readout:
        """The readout restricted to row ``positions`` (int array, host or device)."""
        pos = jnp.asarray(positions)
        ids = np.asarray(self.row_token_ids)[np.asarray(positions)]
        return self.replace(
            W_U=self.W_U[pos], row_norms=self.row_norms[pos], rows_normalized=self.rows_normalized[pos], row_token_ids=ids
        )

    def stats(self) -> dict[str, Any]:
        """``{row_mean, row_norms, row_token_ids}``: what a dictionary checkpoint records of the
        readout it was trained on (the reference's checkpoint keys)."""
        return {
            "row_mean": self.row_mean,
            "row_norms": self.row_norms,
            "row_token_ids": np.asarray(self.row_token_ids, np.int64),
        }

    def with_softcap(self, softcap: float | None) -> Readout:
        return self.replace(softcap=_softcap(softcap))

    def __repr__(self) -> str:
        cap = "" if self.softcap is None else f", softcap={self.softcap:g}"
        dtype = getattr(self.W_U, "dtype", "?")
        return f"Readout(rows={self.vocab_size}, d_model={self.d_model}, dtype={dtype}{cap})"

    def _repr_html_(self) -> str:
        rows = [("rows", self.vocab_size), ("d_model", self.d_model), ("W_U", shape_text(self.W_U)), ("softcap", self.softcap)]
        return html_table("srp-jax Readout", rows)


ROW_NORM_RTOL = 1e-3  # float32 recomputation of a stored norm agrees far closer than this


def _trained_ids(W: jax.Array, dictionary: Any) -> np.ndarray | None:
    """The dictionary's ``row_token_ids`` (or None when it has none), checked against ``W``:
    every id must be a row of ``W``, and when the dictionary recorded ``row_norms`` the rows of
    ``W`` centred by its ``row_mean`` must have those norms. A contradiction means ``W`` is not
    the matrix the dictionary was trained on: a ShapeError, never a silent fallback."""
    V = W.shape[0]
    ids = getattr(dictionary, "row_token_ids", None)
    norms = getattr(dictionary, "row_norms", None)
    if ids is not None:
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            ids = None
        elif ids.dtype.kind not in "iu" or ids.min() < 0 or int(ids.max()) >= V:
            raise ShapeError(
                f"W_U has {V} rows, but the dictionary was trained on token ids up to {int(ids.max())}: "
                "this W_U belongs to another vocabulary"
            )
    if norms is None or getattr(dictionary, "row_mean", None) is None:
        return ids
    stored = np.asarray(norms, np.float32).reshape(-1)
    positions = ids if ids is not None else (np.arange(V) if stored.shape[0] == V else None)
    if positions is None:
        return ids
    if stored.shape[0] != positions.shape[0]:
        raise ShapeError(
            f"the dictionary records {stored.shape[0]} row_norms but {positions.shape[0]} row_token_ids (its "
            "row statistics contradict each other)"
        )
    mean = as_float_array(dictionary.row_mean, name="dictionary row_mean", ndim=1)
    got, _ = _center_normalize(W[jnp.asarray(positions)], mean)
    got = np.asarray(got)
    bad = ~np.isclose(got, stored, rtol=ROW_NORM_RTOL, atol=1e-6)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ShapeError(
            f"W_U contradicts the dictionary's stored row statistics: row {int(positions[i])} centred by the stored "
            f"row_mean has norm {got[i]:.6g}, the dictionary recorded {stored[i]:.6g} ({int(bad.sum())} of "
            f"{bad.size} rows differ); this W_U is not the matrix the dictionary was trained on"
        )
    return ids


def _softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        raise ShapeError(f"softcap must be a positive number, got {softcap!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise ShapeError(f"softcap must be a positive number, got {softcap!r}")
    return value
