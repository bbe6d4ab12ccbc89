"""One token's logit: ``h . w_t = base + sum_i c_i + residual_term`` (the reference fields).

For a row ``w_t`` with normalized row ``x_t``, norm ``a_t`` and code ``z_t = encode(x_t, k)``::

    w_t = mu + a_t * (z_t @ Dec) + r_t
    h . w_t = h . mu  +  sum_i a_t z_{t,i} (h . d_i)  +  h . r_t
            = base    +  feature_sum                  +  residual_term

``token_terms`` is the pure, vmappable kernel every token-row decomposition uses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import factorizers as F
from .._arrays import as_float_array, check_last_dim, static_k
from .._display import fields_repr, html_table, scalar_text, shape_text
from .._pytree import pytree_dataclass
from ..compile import compiled
from ..config import FactorizerConfig
from ..dictionary import inference_view
from ..errors import ShapeError
from ..readout import denormalize_rows

HIGHEST = jax.lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.dot`` at HIGHEST precision (every logit-space product of the decompositions)."""
    return jnp.dot(a, b, precision=HIGHEST)


@pytree_dataclass
class Decomposition:
    """One token-logit decomposition (the reference's fields; a pytree).

    Scalars are 0-d float32; ``feature_contributions`` (D,) is dense with exact zeros at
    inactive features; ``active_feature_indices`` (n_active,) int32, ascending.
    ``reconstructed_logit`` = base + feature_sum (the approximation, without the residual);
    ``identity_error`` = original - (base + feature_sum + residual), float round-off only.
    """

    original_logit: jax.Array
    base_term: jax.Array
    feature_contributions: jax.Array
    feature_sum: jax.Array
    residual_term: jax.Array
    reconstructed_logit: jax.Array
    identity_error: jax.Array
    active_feature_indices: jax.Array

    def _rows(self) -> list[tuple[str, str]]:
        return [
            ("original_logit", scalar_text(self.original_logit)),
            ("base_term", scalar_text(self.base_term)),
            ("feature_sum", scalar_text(self.feature_sum)),
            ("residual_term", scalar_text(self.residual_term)),
            ("active features", shape_text(self.active_feature_indices).split("[")[-1].rstrip("]")),
            ("identity_error", scalar_text(self.identity_error, 2)),
        ]

    def __repr__(self) -> str:
        return fields_repr("Decomposition", [(k.replace(" ", "_"), v) for k, v in self._rows()])

    def _repr_html_(self) -> str:
        return html_table("logit = base + features + residual", self._rows())


def token_terms(
    cfg: FactorizerConfig,
    k: int | None,
    params: F.Params,
    buffers: F.Buffers,
    h: jax.Array,
    w_row: jax.Array,
    row_mean: jax.Array,
    row_norm: jax.Array,
    row_normalized: jax.Array,
) -> dict[str, jax.Array]:
    """The decomposition terms of one (h (d,), row (d,)) pair; pure, vmappable.

    Returns original, base, contributions (D,), code (D,), feature_sum, residual_term,
    reconstructed and identity_error, computed in the reference's order of operations.
    """
    code = F.encode(cfg, params, buffers, row_normalized[None], k)[0]
    scores = dot(params["decoder"], h)  # (D,) = h @ Dec^T
    contributions = row_norm * code * scores
    return {"contributions": contributions, "code": code,
            **scalar_terms(params, h, w_row, row_mean, row_norm, code, contributions)}


def scalar_terms(params, h, w_row, row_mean, row_norm, code, contributions) -> dict[str, jax.Array]:
    """original, base, feature_sum, residual_term (h . r), reconstructed (base + feature_sum)
    and identity_error of one row, given its code (D,) and contributions."""
    residual_row = w_row - denormalize_rows(F.decode(params, code[None])[0], row_mean, row_norm)
    return identity_terms(dot(h, w_row), dot(h, row_mean), jnp.sum(contributions), dot(h, residual_row))


def identity_terms(original, base, feature_sum, residual_term) -> dict[str, jax.Array]:
    """The named scalars of ``original = base + feature_sum + residual_term`` (any equal shapes):
    the four terms, ``reconstructed`` (base + feature_sum) and ``identity_error`` (what the sum
    misses: float round-off only)."""
    return {
        "original": original,
        "base": base,
        "feature_sum": feature_sum,
        "residual_term": residual_term,
        "reconstructed": base + feature_sum,
        "identity_error": original - (base + feature_sum + residual_term),
    }


_token_terms_jit = compiled(token_terms, static_argnums=(0, 1))


def decompose_token_logit(
    h: Any,
    W_row: Any,
    row_mean: Any,
    row_norm: Any,
    row_normalized: Any,
    model: Any,
    k: int | None = None,
) -> Decomposition:
    """Decompose the logit ``h . W_row`` of one token (the reference signature).

    ``h`` (d,), ``W_row`` (d,) the raw unembedding row, ``row_mean`` (d,), ``row_norm`` the
    clamped norm of ``W_row - row_mean`` (scalar), ``row_normalized`` (d,), ``model`` a loaded
    dictionary, ``k`` the audit k (None/0: the trained k). Never gates.
    """
    cfg, params, buffers, d_model = inference_view(model)
    h_a = vector_arg(h, "h", "h must be a single hidden vector", d_model)
    w_a = vector_arg(W_row, "W_row", "W_row must be a single unembedding row", d_model)
    mean_a = vector_arg(row_mean, "row_mean", "row_mean must be a vector", d_model)
    x_a = vector_arg(row_normalized, "row_normalized", "row_normalized must be a single row", d_model)
    norm_a = as_float_array(row_norm, name="row_norm")
    if norm_a.size != 1:
        raise ShapeError(f"row_norm must be a scalar, got shape {tuple(norm_a.shape)}")
    if not isinstance(norm_a, jax.core.Tracer) and not float(norm_a.reshape(())) > 0:
        raise ShapeError(f"row_norm must be > 0 (the clamped norm of W_row - row_mean), got {float(norm_a.reshape(())):g}")
    terms = _token_terms_jit(cfg, static_k(k), params, buffers, h_a, w_a, mean_a, norm_a.reshape(()), x_a)
    active = np.flatnonzero(np.asarray(terms["code"]) != 0).astype(np.int32)
    return Decomposition(
        original_logit=terms["original"],
        base_term=terms["base"],
        feature_contributions=terms["contributions"],
        feature_sum=terms["feature_sum"],
        residual_term=terms["residual_term"],
        reconstructed_logit=terms["reconstructed"],
        identity_error=terms["identity_error"],
        active_feature_indices=jnp.asarray(active),
    )


def vector_arg(x: Any, name: str, rank_message: str, d_model: int) -> jax.Array:
    arr = as_float_array(x, name=name)
    if arr.ndim != 1:
        raise ShapeError(f"{rank_message}: {name} has shape {tuple(arr.shape)}, expected ({d_model},)")
    check_last_dim(name, arr, d_model)
    return arr


__all__ = ["Decomposition", "token_terms", "scalar_terms", "identity_terms", "decompose_token_logit", "vector_arg", "dot"]
