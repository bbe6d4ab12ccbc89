"""Sampling a training batch: pure functions of (data, step key), outside the train step.

The step consumes a :class:`Batch`; everything random happens here, from
``key = fold_in(state.rng, step)``, split into a row key and a prism key, so a resumed run
replays exactly the draws an uninterrupted run makes:

1. ``B`` row positions i.i.d. with replacement from the row-sampling distribution;
   ``x = rows_normalized[idx]``. The default sampler (``"inverse_cdf"``) draws 31 random bits
   per row and binary-searches the cumulative weights (``TrainData.row_cdf``, integer
   thresholds built once on the host): O(B log V) per step. ``"categorical"`` is the previous
   Gumbel-max draw over all V logits (O(B·V); the same distribution, other draws), kept so
   runs made before the switch can be reproduced;
2. the prism batch: ``Bp = min(B, N)`` hidden states h_j uniform with replacement, a rank
   uniform in [0, P) each, the target row t_j = ``top_targets[h_j, rank_j]`` and its raw row,
   normalized row and norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import to_device, to_numpy
from .._pytree import pytree_dataclass
from ..compile import spread_rows
from ..config import ROW_SAMPLERS
from ..errors import ShapeError

CDF_BITS = 31  # thresholds live in [0, 2^31]: exact in uint32, one draw = 31 random bits
CDF_SCALE = 1 << CDF_BITS


def cdf_thresholds(weights: Any) -> np.ndarray:
    """Integer cumulative thresholds (V,) uint32 of non-negative sampling weights (V,).

    ``T[i] = floor(2^31 * sum(w[:i+1]) / sum(w))`` in float64, with every entry from the last
    positive weight on set to exactly 2^31, so a uniform 31-bit draw ``u`` lands in row ``i``
    iff ``T[i-1] <= u < T[i]`` (``T[-1] = 0``): row ``i`` has probability
    ``(T[i] - T[i-1]) / 2^31``, within 2^-31 of its weight's share; a zero weight is never
    drawn (its threshold equals its predecessor's). Raises ShapeError on weights that are not
    a non-empty vector of finite non-negative numbers with a positive sum.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ShapeError(f"sampling weights must be a non-empty vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ShapeError("sampling weights must be finite, non-negative and not all zero")
    cdf = np.cumsum(w) / w.sum()
    thresholds = np.floor(np.minimum(cdf, 1.0) * CDF_SCALE)
    thresholds[int(np.flatnonzero(w > 0)[-1]) :] = CDF_SCALE
    return thresholds.astype(np.uint32)


@pytree_dataclass
class TrainData:
    """Device arrays the sampler reads, and only those: the readout's ``rows_normalized``
    (V, d), ``row_norms`` (V,) and ``row_mean`` (d,); ``hidden`` (N, d) train hidden states;
    ``top_targets`` (N, P) int32 row positions; ``target_rows`` (U, d) the raw W_U rows of the
    U distinct rows ``top_targets`` names, with ``target_slots`` (N, P) int32 each target's
    position among them; ``sample_logits`` (V,) log sampling weights (the ``"categorical"``
    sampler) and ``row_cdf`` (V,) uint32 cumulative thresholds (:func:`cdf_thresholds`, the
    default ``"inverse_cdf"`` sampler), both computed once from the same weights.

    The step reads raw W_U rows only for the prism targets, so the full (V, d) W_U stays off
    the device (at V 248320 x d 2048 that is 2 GB a run does not hold twice)."""

    rows_normalized: jax.Array
    row_norms: jax.Array
    row_mean: jax.Array
    hidden: jax.Array
    top_targets: jax.Array
    target_rows: jax.Array
    target_slots: jax.Array
    sample_logits: jax.Array
    row_cdf: jax.Array

    @classmethod
    def from_dataset(cls, dataset: Any, sample_weights: Any, prism_ranks: int = 1, *, host: bool = False) -> TrainData:
        """From a :class:`~srp_jax.data.PrismDataset` (its ``readout()``) or any object with the
        reference's field names (``W_U``, ``rows_normalized``, ``row_mean``, ``row_norms``,
        ``hidden_train``, ``top_targets``). ``host``: keep NumPy arrays (to be placed on a mesh)
        instead of default-device arrays."""
        asarray = np.asarray if host else to_device
        targets = np.asarray(dataset.top_targets)
        targets = targets[:, : max(1, min(prism_ranks, targets.shape[1] if targets.ndim == 2 else 1))]
        w = np.asarray(sample_weights, np.float64)
        row_cdf = cdf_thresholds(w)
        ro = dataset.readout() if callable(getattr(dataset, "readout", None)) else dataset
        distinct, slots = np.unique(targets, return_inverse=True)
        return cls(
            rows_normalized=asarray(ro.rows_normalized, jnp.float32),
            row_norms=asarray(ro.row_norms, jnp.float32),
            row_mean=asarray(ro.row_mean, jnp.float32),
            hidden=asarray(dataset.hidden_train, jnp.float32),
            top_targets=asarray(targets, jnp.int32),
            target_rows=asarray(_take_rows(ro.W_U, distinct), jnp.float32),
            target_slots=asarray(slots.reshape(targets.shape), jnp.int32),
            sample_logits=asarray(np.log(np.maximum(w, 1e-300)), jnp.float32),
            row_cdf=asarray(row_cdf),
        )


def _take_rows(table: Any, rows: np.ndarray) -> np.ndarray:
    """``table[rows]`` as NumPy, copying only those rows (``table`` NumPy or a jax array)."""
    if isinstance(table, jax.Array):
        return np.asarray(jnp.take(table, jnp.asarray(rows, jnp.int32), axis=0))
    return np.asarray(to_numpy(table, name="W_U")[rows])


@pytree_dataclass
class PrismBatch:
    """The prism penalty's inputs for Bp (hidden state, target row) pairs: ``h`` (Bp, d),
    ``x`` (Bp, d) the targets' normalized rows, ``w`` (Bp, d) their raw rows, ``a`` (Bp,)
    their norms, ``row_mean`` (d,)."""

    h: jax.Array
    x: jax.Array
    w: jax.Array
    a: jax.Array
    row_mean: jax.Array


@pytree_dataclass
class Batch:
    """One step's inputs: ``x`` (B, d) normalized rows; ``prism`` a :class:`PrismBatch` or
    None (no prism term)."""

    x: jax.Array
    prism: PrismBatch | None = None


def step_key(rng: jax.Array, step: Any) -> jax.Array:
    """The key of update number ``step`` (1-based): ``fold_in(rng, step)``."""
    return jax.random.fold_in(rng, step)


def sample_row_indices(key: jax.Array, sample_logits: jax.Array, batch: int) -> jax.Array:
    """B row positions drawn i.i.d. with replacement from softmax(sample_logits) (= the weights)
    by a Gumbel-max draw over all V logits: O(B·V) (the ``"categorical"`` sampler). On a mesh
    the draws are split over every device (``spread_rows``: same values)."""
    return spread_rows(jax.random.categorical(key, sample_logits, shape=(batch,)))


def rows_from_bits(row_cdf: jax.Array, u: jax.Array) -> jax.Array:
    """The row of each 31-bit draw ``u`` (uint32 in [0, 2^31)): the first ``i`` with
    ``row_cdf[i] > u`` (a binary search, O(log V) per draw), int32."""
    return jnp.searchsorted(row_cdf, u, side="right").astype(jnp.int32)


def sample_rows_inverse_cdf(key: jax.Array, row_cdf: jax.Array, batch: int) -> jax.Array:
    """B row positions drawn i.i.d. with replacement by inverse CDF: 31 random bits per row,
    then :func:`rows_from_bits` over the thresholds of :func:`cdf_thresholds`. O(B log V)."""
    u = jax.random.bits(key, (batch,), jnp.uint32) >> (32 - CDF_BITS)
    return spread_rows(rows_from_bits(row_cdf, u))


def draw_rows(data: TrainData, key: jax.Array, batch: int, sampler: str = "inverse_cdf") -> jax.Array:
    """B row positions from ``data``'s sampling distribution with ``sampler`` (one of
    :data:`ROW_SAMPLERS`)."""
    if sampler == "inverse_cdf":
        return sample_rows_inverse_cdf(key, data.row_cdf, batch)
    if sampler == "categorical":
        return sample_row_indices(key, data.sample_logits, batch)
    raise ValueError(f"unknown row sampler {sampler!r}; expected one of {ROW_SAMPLERS}")


def sample_prism_batch(key: jax.Array, data: TrainData, batch: int) -> PrismBatch:
    """Bp = ``batch`` hidden states uniform with replacement, each with a uniform rank in
    [0, P) and its target row ``top_targets[h, rank]``."""
    k_h, k_r = jax.random.split(key)
    n_hidden, n_ranks = data.top_targets.shape
    h_idx = jax.random.randint(k_h, (batch,), 0, n_hidden)
    rank = jax.random.randint(k_r, (batch,), 0, n_ranks)
    tok = data.top_targets[h_idx, rank]
    w = data.target_rows[data.target_slots[h_idx, rank]]
    return PrismBatch(h=data.hidden[h_idx], x=data.rows_normalized[tok], w=w, a=data.row_norms[tok], row_mean=data.row_mean)


def sample_batch(
    data: TrainData, rng: jax.Array, step: Any, *, batch_size: int, prism_batch: int, row_sampler: str = "inverse_cdf"
) -> Batch:
    """The batch of update ``step``: rows (drawn with ``row_sampler``), and a prism batch when
    ``prism_batch`` > 0."""
    k_rows, k_prism = jax.random.split(step_key(rng, step))
    x = data.rows_normalized[draw_rows(data, k_rows, batch_size, row_sampler)]
    prism = sample_prism_batch(k_prism, data, prism_batch) if prism_batch > 0 else None
    return Batch(x=x, prism=prism)


__all__ = [
    "ROW_SAMPLERS",
    "cdf_thresholds",
    "rows_from_bits",
    "sample_rows_inverse_cdf",
    "draw_rows",
    "TrainData",
    "PrismBatch",
    "Batch",
    "step_key",
    "sample_row_indices",
    "sample_prism_batch",
    "sample_batch",
]
