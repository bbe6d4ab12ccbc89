"""Feature labels: which vocabulary rows each feature reads out most strongly.

A feature's *top rows* are the readout rows with the largest encoder activation for it,
``relu(x_v . W_enc[:, f] + b_f)`` over the normalized rows ``x_v`` (the reference's display
labelling). Computed in jitted blocks of rows, so all features of a full vocabulary fit in
memory (a running top-n per feature).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .compile import compiled
from .dictionary import inference_view
from .factorizers import pre_activation


@compiled(static_argnames=("n", "block"))
def _top_rows(params, X, features, *, n: int, block: int):
    """(values (F, n), row positions (F, n)) of the n largest activations per feature."""
    kernel = params["encoder"]["kernel"][:, features]
    sub = {"encoder": {"kernel": kernel, "bias": params["encoder"]["bias"][features]}}
    V = X.shape[0]
    n_blocks = -(-V // block)
    padded = jnp.pad(X, ((0, n_blocks * block - V), (0, 0))).reshape(n_blocks, block, -1)

    def body(carry, args):
        best_v, best_i = carry
        xb, start = args
        acts = jax.nn.relu(pre_activation(sub, xb)).T  # (F, block)
        pos = start + jnp.arange(block)
        acts = jnp.where(pos[None, :] < V, acts, -jnp.inf)
        vals = jnp.concatenate([best_v, acts], axis=1)
        idx = jnp.concatenate([best_i, jnp.broadcast_to(pos, acts.shape)], axis=1)
        top_v, where = jax.lax.top_k(vals, n)  # ties: the earlier (lower) row wins
        return (top_v, jnp.take_along_axis(idx, where, axis=1)), None

    F = features.shape[0]
    init = (jnp.full((F, n), -jnp.inf, X.dtype), jnp.zeros((F, n), jnp.int32))
    (values, rows), _ = jax.lax.scan(body, init, (padded, jnp.arange(n_blocks) * block))
    return values, rows


def top_rows_by_activation(
    dictionary: Any, readout: Any, features: Any = None, n: int = 6, *, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """``(token_ids (F, n), activations (F, n))`` of each feature's n most activating rows.

    ``features`` (F,) feature ids (default: all); ``readout`` a
    :class:`~srp_jax.readout.Readout` (its ``row_token_ids`` map row positions to token ids).
    Ties go to the lower row.
    """
    _, params, _, _ = inference_view(dictionary)
    ids = np.arange(dictionary.d_features) if features is None else np.asarray(features, np.int64).reshape(-1)
    X = jnp.asarray(readout.rows_normalized)
    n = int(min(n, X.shape[0]))
    values, rows = _top_rows(params, X, jnp.asarray(ids, jnp.int32), n=n, block=int(min(block, X.shape[0])))
    token_ids = np.asarray(readout.row_token_ids, np.int64)[np.asarray(rows)]
    return token_ids, np.asarray(values)


__all__ = ["top_rows_by_activation"]
