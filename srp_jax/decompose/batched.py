"""Many (hidden state, token) pairs in one jitted call, with fixed shapes.

Dense (``sparse=False``): every pair's (D,) contributions, vmapped over the token kernel.
Sparse (``sparse=True``): for the TopK family (at most k active, k < D) the codes come from a
:class:`~srp_jax.decompose.codes.CodeTable` (``codes=``, or one cached by
:func:`~srp_jax.decompose.codes.code_table`) or from one batched sparse encode of the query
rows; then each pair touches only its k decoder rows: contributions from k gathered
dot products and the residual row from the sparse decode (O(k·d) per pair, no dense decode).
Other architectures (``max_active``) keep the dense per-pair path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import factorizers as F
from .._arrays import as_float_array, as_index_array, check_last_dim, static_k, to_numpy
from .._display import fields_repr, html_table, shape_text
from .._pytree import pytree_dataclass
from ..compile import compiled
from ..dictionary import inference_view
from ..errors import ConfigError, ShapeError
from ..factorizers import sparse as S
from ..readout import denormalize_rows
from .codes import CodeTable, cached_code_table, sparse_codes_by_feature
from .token import HIGHEST, dot, identity_terms, scalar_terms, token_terms


@pytree_dataclass
class TokenDecompositions:
    """Decompositions of B (hidden state, token) pairs, fixed shapes (a pytree).

    Scalars per pair are (B,). Features are in one of two layouts:

    * dense (``sparse=False``): ``feature_contributions`` (B, D) with exact zeros at inactive
      features, ``feature_indices`` None;
    * sparse (``sparse=True``): the ``m`` active (index, contribution) pairs per row:
      ``feature_indices`` (B, m) int32 ascending, padded with -1; ``feature_contributions``
      (B, m) with 0 at padding. ``m`` = k for the TopK family (exact: at most k are active),
      else ``max_active``. ``truncated`` (B,) flags rows with more than ``m`` active features;
      their ``feature_sum`` then covers the listed features only (and ``identity_error``
      shows the dropped mass).

    ``n_active`` (B,) counts active features (code != 0).
    """

    original_logit: jax.Array
    base_term: jax.Array
    feature_sum: jax.Array
    residual_term: jax.Array
    reconstructed_logit: jax.Array
    identity_error: jax.Array
    n_active: jax.Array
    feature_contributions: jax.Array
    feature_indices: jax.Array | None = None
    truncated: jax.Array | None = None

    def __repr__(self) -> str:
        layout = "dense" if self.feature_indices is None else f"sparse[{int(self.feature_indices.shape[-1])}]"
        return fields_repr("TokenDecompositions", [
            ("pairs", int(self.original_logit.shape[0])), ("layout", layout),
            ("feature_contributions", shape_text(self.feature_contributions)),
        ])  # fmt: skip

    def _repr_html_(self) -> str:
        return html_table(repr(self).split("(")[0], [(k, v) for k, v in (
            ("pairs", int(self.original_logit.shape[0])), ("feature_contributions", shape_text(self.feature_contributions)),
            ("feature_indices", shape_text(self.feature_indices)),
        )])  # fmt: skip


def _sparse_terms(cfg, k, m, params, buffers, h, w_row, row_mean, row_norm, row_normalized):
    """Like ``token_terms`` but touching only the ``m`` largest-code decoder rows."""
    code = F.encode(cfg, params, buffers, row_normalized[None], k)[0]
    D = code.shape[0]
    n_active = jnp.sum(code != 0)
    # Largest |code| first; then order the kept ones by feature index, padding last.
    _, top_idx = jax.lax.top_k(jnp.abs(code), m)
    valid = code[top_idx] != 0
    key = jnp.where(valid, top_idx, D)
    order = jnp.argsort(key)
    idx = top_idx[order]
    valid = valid[order]
    vals = jnp.where(valid, code[idx], 0.0)
    rows = jnp.take(params["decoder"], idx, axis=0)  # (m, d)
    scores = dot(rows, h)
    contributions = jnp.where(valid, row_norm * vals * scores, 0.0)
    return {
        "contributions": contributions,
        "indices": jnp.where(valid, idx, -1).astype(jnp.int32),
        "n_active": n_active,
        "truncated": n_active > m,
        **scalar_terms(params, h, w_row, row_mean, row_norm, code, contributions),
    }


@compiled(static_argnums=(0, 1, 2))
def _batched_terms(cfg, k, m, params, buffers, h, w_rows, row_mean, row_norms, rows_normalized):
    if m is None:
        fn = lambda *a: token_terms(cfg, k, params, buffers, *a)  # noqa: E731
    else:
        fn = lambda *a: _sparse_terms(cfg, k, m, params, buffers, *a)  # noqa: E731
    return jax.vmap(fn, in_axes=(0, 0, None, 0, 0))(h, w_rows, row_mean, row_norms, rows_normalized)


def _rowwise_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bd,bd->b", a, b, precision=HIGHEST)


def _code_terms(m, params, code, h, w_rows, row_mean, row_norms):
    """(traced) Decompose B pairs from their codes laid out by feature (B, k): the residual
    row from the sparse decode of the whole code, contributions of its ``m`` largest |values|
    (all of them when m >= k)."""
    dec = params["decoder"]
    n_active = jnp.sum(code.indices >= 0, axis=-1).astype(jnp.int32)
    if m >= code.values.shape[1]:  # every entry listed: one gather pass for decode and scores
        recon, scores = S.combine_and_dot_rows(dec, code.values, S.safe_indices(code.indices), h)
        contributions = jnp.where(code.indices >= 0, row_norms[:, None] * code.values * scores, 0.0)
        return _assemble(h, w_rows, row_mean, row_norms, recon, contributions, code.indices, n_active, m)
    recon = S.combine_rows(dec, code.values, S.safe_indices(code.indices))
    # the m largest |values| are listed, back in feature order
    _, pos = jax.lax.top_k(jnp.where(code.indices >= 0, jnp.abs(code.values), -1.0), m)
    picked = S.SparseCode(jnp.take_along_axis(code.values, pos, 1), jnp.take_along_axis(code.indices, pos, 1))
    key = jnp.where(picked.indices >= 0, picked.indices, jnp.iinfo(jnp.int32).max)
    _, vals, idx = jax.lax.sort((key, picked.values, picked.indices), dimension=1, num_keys=1)
    listed = S.SparseCode(vals, idx)
    valid = listed.indices >= 0
    scores = S.dot_rows(dec, h, S.safe_indices(listed.indices))  # (B, m): h . d_i
    contributions = jnp.where(valid, row_norms[:, None] * listed.values * scores, 0.0)
    return _assemble(h, w_rows, row_mean, row_norms, recon, contributions, listed.indices, n_active, m)


def _assemble(h, w_rows, row_mean, row_norms, recon, contributions, indices, n_active, m):
    residual_row = w_rows - denormalize_rows(recon, row_mean, row_norms)
    terms = identity_terms(_rowwise_dot(h, w_rows), jnp.matmul(h, row_mean, precision=HIGHEST),
                           jnp.sum(contributions, axis=-1), _rowwise_dot(h, residual_row))  # fmt: skip
    return {
        **terms,
        "contributions": contributions,
        "indices": indices,
        "n_active": n_active,
        "truncated": n_active > m,
    }


@compiled(static_argnums=(0,))
def _table_terms(m, params, values, indices, pos, h, W_U, row_mean, row_norms):
    code = S.SparseCode(values[pos], indices[pos])
    return _code_terms(m, params, code, h, W_U[pos], row_mean, row_norms[pos])


@compiled(static_argnums=(0, 1, 2))
def _fresh_code_terms(cfg, k, m, params, buffers, h, w_rows, row_mean, row_norms, rows_normalized):
    code, _ = sparse_codes_by_feature(cfg, params, buffers, rows_normalized, k)
    return _code_terms(m, params, code, h, w_rows, row_mean, row_norms)


def _sparse_width(cfg, k_static, max_active) -> int | None:
    """The listed width m of a sparse decomposition (None: dense)."""
    if cfg.arch.at_most_k_active:
        m = min(cfg.resolve_k(k_static), cfg.d_features)
    elif max_active is None:
        raise ConfigError(f"sparse decomposition of a {cfg.architecture} dictionary needs max_active=")
    if max_active is not None:
        if isinstance(max_active, bool) or not isinstance(max_active, (int, np.integer)) or max_active < 1:
            raise ConfigError(f"max_active must be a positive integer, got {max_active!r}")
        m = min(int(max_active), cfg.d_features)
    return m


def _sparse_result(t) -> TokenDecompositions:
    return TokenDecompositions(
        t["original"], t["base"], t["feature_sum"], t["residual_term"], t["reconstructed"],
        t["identity_error"], t["n_active"], t["contributions"], t["indices"], t["truncated"],
    )


def decompose_rows(
    h: Any,
    W_rows: Any,
    row_mean: Any,
    row_norms: Any,
    rows_normalized: Any,
    model: Any,
    k: int | None = None,
    *,
    sparse: bool = False,
    max_active: int | None = None,
) -> TokenDecompositions:
    """Decompose B pairs (h[i], W_rows[i]) in one jitted, vmapped call.

    h (B, d), W_rows (B, d), row_mean (d,), row_norms (B,), rows_normalized (B, d).
    ``sparse=True`` returns the active (index, contribution) pairs instead of dense (B, D)
    contributions and gathers only those decoder rows (see :class:`TokenDecompositions`); for
    the TopK family the codes of the rows come from one batched sparse encode.
    """
    cfg, params, buffers, d_model = inference_view(model)
    h_a = as_float_array(h, name="h", ndim=2)
    w_a = as_float_array(W_rows, name="W_rows", ndim=2)
    x_a = as_float_array(rows_normalized, name="rows_normalized", ndim=2)
    mean_a = as_float_array(row_mean, name="row_mean", ndim=1)
    norms_a = as_float_array(row_norms, name="row_norms", ndim=1)
    for name, arr in (("h", h_a), ("W_rows", w_a), ("rows_normalized", x_a), ("row_mean", mean_a)):
        check_last_dim(name, arr, d_model)
    B = h_a.shape[0]
    for name, arr in (("W_rows", w_a), ("rows_normalized", x_a), ("row_norms", norms_a)):
        if arr.shape[0] != B:
            raise ShapeError(f"{name} has {arr.shape[0]} rows but h has {B}")
    if not isinstance(norms_a, jax.core.Tracer) and norms_a.size and not bool(jnp.all(norms_a > 0)):
        raise ShapeError(f"row_norms must be > 0 (clamped norms of the centred rows), got minimum {float(jnp.min(norms_a)):g}")
    k_static = static_k(k)
    m = _sparse_width(cfg, k_static, max_active) if sparse else None
    if m is not None and F.sparse_code_available(cfg, k_static):
        kk = cfg.resolve_k(k_static)
        return _sparse_result(_fresh_code_terms(cfg, kk, min(m, kk), params, buffers, h_a, w_a, mean_a, norms_a, x_a))
    t = _batched_terms(cfg, k_static, m, params, buffers, h_a, w_a, mean_a, norms_a, x_a)
    if m is None:
        n_active = jnp.sum(t["code"] != 0, axis=-1)
        return TokenDecompositions(
            t["original"], t["base"], t["feature_sum"], t["residual_term"], t["reconstructed"],
            t["identity_error"], n_active, t["contributions"],
        )
    return _sparse_result(t)


def decompose_tokens(
    h: Any,
    token_ids: Any,
    readout: Any,
    model: Any,
    k: int | None = None,
    *,
    sparse: bool = False,
    max_active: int | None = None,
    codes: CodeTable | None = None,
) -> TokenDecompositions:
    """Decompose the logits of vocabulary ``token_ids`` (B,) under hidden states h (B, d).

    ``readout`` is a :class:`srp_jax.readout.Readout` prepared with the dictionary's row mean
    (``Readout.for_dictionary``). One jitted call for the whole batch. With ``sparse=True``
    (TopK family) the codes of the tokens' rows come from ``codes`` (a
    :class:`~srp_jax.decompose.codes.CodeTable` of this dictionary, readout and k), else from
    the table :func:`~srp_jax.decompose.codes.code_table` cached for them, else from one
    batched encode of those rows; each pair then costs O(k·d).
    """
    if np.size(to_numpy(token_ids, name="token_ids")) == 0:
        raise ShapeError("token_ids is empty: give at least one token id to decompose")
    ids = as_index_array(token_ids, name="token_ids", ndim=1)
    pos = jnp.asarray(readout.positions(ids))
    if codes is not None and not sparse:
        raise ConfigError("codes= (a CodeTable) applies to sparse=True decompositions")
    cfg, params, _, d_model = inference_view(model)
    k_static = static_k(k)
    if sparse and F.sparse_code_available(cfg, k_static):
        table = codes if codes is not None else cached_code_table(model, readout, k_static)
        if table is not None:
            kk = cfg.resolve_k(k_static)
            if not isinstance(table, CodeTable) or table.k != kk or table.d_features != cfg.d_features:
                raise ConfigError(f"codes must be the CodeTable of this dictionary at k {kk}")
            if table.n_rows != readout.rows_normalized.shape[0]:
                raise ShapeError(f"codes hold {table.n_rows} rows but the readout has {readout.rows_normalized.shape[0]}")
            h_a = as_float_array(h, name="h", ndim=2)
            check_last_dim("h", h_a, d_model)
            if h_a.shape[0] != pos.shape[0]:
                raise ShapeError(f"token_ids has {pos.shape[0]} rows but h has {h_a.shape[0]}")
            m = min(_sparse_width(cfg, k_static, max_active), kk)
            return _sparse_result(_table_terms(
                m, params, table.values, table.indices, pos, h_a, readout.W_U, readout.row_mean, readout.row_norms
            ))
    elif codes is not None:
        raise ConfigError(f"codes= needs a TopK-family dictionary (k < D); got {cfg.architecture}")
    return decompose_rows(
        h, readout.W_U[pos], readout.row_mean, readout.row_norms[pos], readout.rows_normalized[pos],
        model, k, sparse=sparse, max_active=max_active,
    )


def batch_decomposition_identity_error(h, W_rows, row_mean, row_norms, rows_normalized, model, k=None) -> jax.Array:
    """|identity error| (B,) of the pairs (h[i], W_rows[i]) (the reference helper)."""
    return jnp.abs(decompose_rows(h, W_rows, row_mean, row_norms, rows_normalized, model, k).identity_error)


__all__ = ["TokenDecompositions", "decompose_rows", "decompose_tokens", "batch_decomposition_identity_error"]
