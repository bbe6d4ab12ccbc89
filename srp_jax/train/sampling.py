"""Sampling a training batch: pure functions of (data, step key), outside the train step.

The step consumes a :class:`Batch`; everything random happens here, from
``key = fold_in(state.rng, step)``, split into a row key and a prism key, so a resumed run
replays exactly the draws an uninterrupted run makes:

1. ``B`` row positions i.i.d. with replacement from the row-sampling distribution;
   ``x = rows_normalized[idx]``;
2. the prism batch: ``Bp = min(B, N)`` hidden states h_j uniform with replacement, a rank
   uniform in [0, P) each, the target row t_j = ``top_targets[h_j, rank_j]`` and its raw row,
   normalized row and norm.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..compile import spread_rows
from ..readout import Readout


@flax.struct.dataclass
class TrainData:
    """Device arrays the sampler reads: ``readout`` (the kept rows: W_U, rows_normalized,
    row_mean, row_norms), ``hidden`` (N, d) train hidden states, ``top_targets`` (N, P) int32
    row positions, ``sample_logits`` (V,) log sampling weights."""

    readout: Readout
    hidden: jax.Array
    top_targets: jax.Array
    sample_logits: jax.Array

    # the row arrays under their reference names
    W_U = property(lambda self: self.readout.W_U)
    rows_normalized = property(lambda self: self.readout.rows_normalized)
    row_mean = property(lambda self: self.readout.row_mean)
    row_norms = property(lambda self: self.readout.row_norms)

    @classmethod
    def from_dataset(cls, dataset: Any, sample_weights: Any, prism_ranks: int = 1, *, host: bool = False) -> TrainData:
        """From a :class:`~srp_jax.data.PrismDataset` (or any object with its fields).
        ``host``: keep NumPy arrays (to be placed on a mesh) instead of default-device arrays."""
        asarray = np.asarray if host else jnp.asarray
        targets = np.asarray(dataset.top_targets)
        targets = targets[:, : max(1, min(prism_ranks, targets.shape[1] if targets.ndim == 2 else 1))]
        w = np.asarray(sample_weights, np.float64)
        if callable(getattr(dataset, "readout", None)):
            readout = dataset.readout()
        else:  # any object with the reference's field names
            readout = Readout(
                W_U=dataset.W_U, row_mean=dataset.row_mean, row_norms=dataset.row_norms,
                rows_normalized=dataset.rows_normalized,
                row_token_ids=getattr(dataset, "row_token_ids", np.arange(np.shape(dataset.W_U)[0])),
            )
        # device-resident once (ids as int32), so no array crosses to the device per step
        readout = readout.replace(
            W_U=asarray(readout.W_U, jnp.float32),
            row_mean=asarray(readout.row_mean, jnp.float32),
            row_norms=asarray(readout.row_norms, jnp.float32),
            rows_normalized=asarray(readout.rows_normalized, jnp.float32),
            row_token_ids=asarray(np.asarray(readout.row_token_ids), jnp.int32),
        )
        return cls(
            readout=readout,
            hidden=asarray(dataset.hidden_train, jnp.float32),
            top_targets=asarray(targets, jnp.int32),
            sample_logits=asarray(np.log(np.maximum(w, 1e-300)), jnp.float32),
        )


@flax.struct.dataclass
class PrismBatch:
    """The prism penalty's inputs for Bp (hidden state, target row) pairs: ``h`` (Bp, d),
    ``x`` (Bp, d) the targets' normalized rows, ``w`` (Bp, d) their raw rows, ``a`` (Bp,)
    their norms, ``row_mean`` (d,)."""

    h: jax.Array
    x: jax.Array
    w: jax.Array
    a: jax.Array
    row_mean: jax.Array


@flax.struct.dataclass
class Batch:
    """One step's inputs: ``x`` (B, d) normalized rows; ``prism`` a :class:`PrismBatch` or
    None (no prism term)."""

    x: jax.Array
    prism: PrismBatch | None = None


def step_key(rng: jax.Array, step: Any) -> jax.Array:
    """The key of update number ``step`` (1-based): ``fold_in(rng, step)``."""
    return jax.random.fold_in(rng, step)


def sample_row_indices(key: jax.Array, sample_logits: jax.Array, batch: int) -> jax.Array:
    """B row positions drawn i.i.d. with replacement from softmax(sample_logits) (= the weights).
    On a mesh the draws are split over every device (``spread_rows``: same values)."""
    return spread_rows(jax.random.categorical(key, sample_logits, shape=(batch,)))


def sample_prism_batch(key: jax.Array, data: TrainData, batch: int) -> PrismBatch:
    """Bp = ``batch`` hidden states uniform with replacement, each with a uniform rank in
    [0, P) and its target row ``top_targets[h, rank]``."""
    k_h, k_r = jax.random.split(key)
    n_hidden, n_ranks = data.top_targets.shape
    h_idx = jax.random.randint(k_h, (batch,), 0, n_hidden)
    rank = jax.random.randint(k_r, (batch,), 0, n_ranks)
    tok = data.top_targets[h_idx, rank]
    ro = data.readout
    return PrismBatch(h=data.hidden[h_idx], x=ro.rows_normalized[tok], w=ro.W_U[tok], a=ro.row_norms[tok], row_mean=ro.row_mean)


def sample_batch(data: TrainData, rng: jax.Array, step: Any, *, batch_size: int, prism_batch: int) -> Batch:
    """The batch of update ``step``: rows, and a prism batch when ``prism_batch`` > 0."""
    k_rows, k_prism = jax.random.split(step_key(rng, step))
    x = data.readout.rows_normalized[sample_row_indices(k_rows, data.sample_logits, batch_size)]
    prism = sample_prism_batch(k_prism, data, prism_batch) if prism_batch > 0 else None
    return Batch(x=x, prism=prism)


__all__ = [
    "TrainData",
    "PrismBatch",
    "Batch",
    "step_key",
    "sample_row_indices",
    "sample_prism_batch",
    "sample_batch",
]
