"""General linear queries ``s = sum_t alpha_t (h . w_t) - m (h . mu)`` (method.md 3.3a).

They decompose like a token logit, with the coefficient ``beta_i = sum_t alpha_t a_t z_{t,i}``
and base ``(sum alpha - m) (h . mu)``; ``residual`` = exact - approx (the gate's epsilon).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import factorizers as F
from .._arrays import as_float_array, as_index_array, check_last_dim, static_k, to_numpy
from .._display import fields_repr, html_table, scalar_text, shape_text
from .._pytree import pytree_dataclass
from ..compile import compiled
from ..config import FactorizerConfig
from ..dictionary import inference_view
from ..errors import ConfigError, NonFiniteError, ShapeError
from ..readout import center_normalize, resolve_row_mean
from .token import HIGHEST, dot, vector_arg


def query_terms(
    cfg: FactorizerConfig,
    k: int | None,
    params: F.Params,
    buffers: F.Buffers,
    h: jax.Array,
    rows: jax.Array,
    alphas: jax.Array,
    exact_logits: jax.Array,
    row_mean: jax.Array,
    mean_subtract: jax.Array,
) -> dict[str, jax.Array]:
    """Decompose ``s = sum_t alpha_t (h . w_t) - m (h . mu)`` for one h; pure, vmappable.

    rows (T, d) raw rows, alphas (T,), exact_logits (T,) the logits of those tokens (the
    caller's; usually h . w_t). Returns exact, base, coeff (D,) = sum_t alpha_t a_t z_t,
    scores (D,) = h . d_i, contributions (D,), feature_sum, approx, residual and
    identity_abs_error = |h . q - exact|.
    """
    norms, x = center_normalize(rows, row_mean)
    z = F.encode(cfg, params, buffers, x, k)
    coeff = jnp.sum(alphas[:, None] * norms[:, None] * z, axis=0)
    scores = dot(params["decoder"], h)
    contributions = coeff * scores
    h_mean = dot(h, row_mean)
    exact = jnp.sum(alphas * exact_logits) - mean_subtract * h_mean
    base = (jnp.sum(alphas) - mean_subtract) * h_mean
    feature_sum = jnp.sum(contributions)
    approx = base + feature_sum
    query_row = jnp.sum(alphas[:, None] * rows, axis=0) - mean_subtract * row_mean
    return {
        "exact": exact,
        "base": base,
        "coeff": coeff,
        "scores": scores,
        "contributions": contributions,
        "feature_sum": feature_sum,
        "approx": approx,
        "residual": exact - approx,
        "identity_abs_error": jnp.abs(dot(h, query_row) - exact),
    }


_query_terms_jit = compiled(query_terms, static_argnums=(0, 1))


@pytree_dataclass
class QueryDecomposition:
    """A general query's decomposition (scalars as 0-d arrays; features ascending by id).

    ``exact_score`` = s_exact, ``base_term``, ``sparse_feature_sum``, ``approx_score`` = base
    + feature sum, ``residual`` = exact - approx, ``residual_abs_over_direct`` =
    |residual| / max(|exact|, 1e-8), ``sign_preserved`` (np.sign equality, 0 its own sign),
    ``identity_abs_error`` = |h . q - exact| (nonzero when the logits passed in differ from
    h . W). Per active feature (beta != 0): ``feature_ids``, ``contributions``,
    ``feature_hidden_scores`` (h . d_i) and ``query_feature_coeffs`` (beta_i).
    """

    exact_score: jax.Array
    base_term: jax.Array
    sparse_feature_sum: jax.Array
    approx_score: jax.Array
    residual: jax.Array
    residual_abs_over_direct: jax.Array
    sign_preserved: jax.Array
    identity_abs_error: jax.Array
    weight_sum: jax.Array
    mean_subtract: jax.Array
    feature_ids: jax.Array
    contributions: jax.Array
    feature_hidden_scores: jax.Array
    query_feature_coeffs: jax.Array

    @property
    def n_active_features(self) -> int:
        return int(self.feature_ids.shape[0])

    def _rows(self) -> list[tuple[str, str]]:
        return [
            ("exact_score", scalar_text(self.exact_score)),
            ("base_term", scalar_text(self.base_term)),
            ("sparse_feature_sum", scalar_text(self.sparse_feature_sum)),
            ("residual", scalar_text(self.residual)),
            ("active features", str(self.n_active_features)),
        ]

    def __repr__(self) -> str:
        return fields_repr("QueryDecomposition", [(k.replace(" ", "_"), v) for k, v in self._rows()])

    def _repr_html_(self) -> str:
        return html_table("score = base + features + residual", self._rows())

    def feature_rows(self) -> list[dict[str, Any]]:
        """One dict per active feature in ascending id order (``feature_rank_active`` is the
        1-based position in that order, not a magnitude rank)."""
        ids = np.asarray(self.feature_ids).tolist()
        contrib = np.asarray(self.contributions).tolist()
        scores = np.asarray(self.feature_hidden_scores).tolist()
        coeffs = np.asarray(self.query_feature_coeffs).tolist()
        return [
            {
                "feature_id": int(fid),
                "feature_rank_active": rank,
                "contribution": float(c),
                "abs_contribution": abs(float(c)),
                "feature_hidden_score": float(s),
                "query_feature_coeff": float(b),
            }
            for rank, (fid, c, s, b) in enumerate(zip(ids, contrib, scores, coeffs), start=1)
        ]

    def summary(self) -> dict[str, Any]:
        """The reference ``decompose_query`` summary dict (Python scalars)."""
        return {
            "exact_score": float(self.exact_score),
            "base_term": float(self.base_term),
            "sparse_feature_sum": float(self.sparse_feature_sum),
            "approx_score": float(self.approx_score),
            "residual": float(self.residual),
            "residual_abs_over_direct": float(self.residual_abs_over_direct),
            "sign_preserved": int(self.sign_preserved),
            "n_active_features": self.n_active_features,
            "mean_subtract": float(self.mean_subtract),
            "weight_sum": float(self.weight_sum),
            "identity_abs_error": float(self.identity_abs_error),
        }


def centering_mean(row_mean: Any, W: jax.Array, model: Any, d_model: int) -> jax.Array:
    """The given ``row_mean``, else the one the dictionary was trained with, by the readout's
    rule (:func:`srp_jax.readout.resolve_row_mean`: the stored mean, else the mean of W)."""
    if row_mean is None:
        return resolve_row_mean(W, ckpt=model)
    return vector_arg(row_mean, "row_mean", "row_mean must be a vector", d_model)


def _weights_arrays(weights: Mapping[int, float] | tuple[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(weights, Mapping):
        if not weights:
            raise ConfigError("query weights are empty")
        ids = np.array(sorted(int(t) for t in weights), dtype=np.int64)
        alphas = np.array([float(weights[int(t)]) for t in ids], dtype=np.float32)
    else:
        ids_raw, alphas_raw = weights
        ids = as_index_array(ids_raw, name="query token ids", ndim=1)
        alphas = np.asarray(to_numpy(alphas_raw, name="query weights"), dtype=np.float32)
        if alphas.shape != ids.shape:
            raise ShapeError(f"query weights have shape {alphas.shape} but token ids {ids.shape}")
        order = np.argsort(ids, kind="stable")
        ids, alphas = ids[order], alphas[order]
    if not np.all(np.isfinite(alphas)):
        raise NonFiniteError("query weights hold NaN or Inf")
    return ids, alphas


def decompose_query(
    h: Any,
    weights: Mapping[int, float] | tuple[Any, Any],
    model: Any,
    *,
    W_U: Any,
    row_mean: Any = None,
    mean_subtract: float = 0.0,
    logits: Any = None,
    k: int | None = None,
) -> QueryDecomposition:
    """Decompose a general linear query ``sum_t alpha_t (h . w_t) - m (h . mu)``.

    ``weights`` {token id: alpha} (from :func:`build_query_weights`) or (ids, alphas);
    ``W_U`` (V, d) the raw unembedding (vocabulary ids index its rows); ``row_mean`` the
    centering mean (default: the dictionary's stored one, see ``resolve_row_mean``);
    ``logits`` (V,) the caller's logits for ``exact`` (default h . W_U in float32).
    """
    cfg, params, buffers, d_model = inference_view(model)
    h_a = vector_arg(h, "h", "h must be a single hidden vector", d_model)
    W = as_float_array(W_U, name="W_U", ndim=2)
    check_last_dim("W_U", W, d_model)
    ids, alphas = _weights_arrays(weights)
    if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
        raise ShapeError(f"query token id outside the vocabulary [0, {W.shape[0]})")
    mean_a = centering_mean(row_mean, W, model, d_model)
    rows = W[jnp.asarray(ids)]
    if logits is None:
        exact_logits = jnp.matmul(rows, h_a, precision=HIGHEST)
    else:
        lg = as_float_array(logits, name="logits", ndim=1)
        if lg.shape[0] != W.shape[0]:
            raise ShapeError(f"logits have length {lg.shape[0]} but W_U has {W.shape[0]} rows")
        exact_logits = lg[jnp.asarray(ids)]
    t = _query_terms_jit(
        cfg, static_k(k), params, buffers, h_a, rows, jnp.asarray(alphas), exact_logits, mean_a,
        jnp.float32(mean_subtract),
    )
    coeff = np.asarray(t["coeff"])
    active = np.flatnonzero(coeff != 0)
    exact, approx = t["exact"], t["approx"]
    return QueryDecomposition(
        exact_score=exact,
        base_term=t["base"],
        sparse_feature_sum=jnp.sum(t["contributions"][active]),
        approx_score=approx,
        residual=t["residual"],
        residual_abs_over_direct=jnp.abs(t["residual"]) / jnp.maximum(jnp.abs(exact), 1e-8),
        sign_preserved=(jnp.sign(exact) == jnp.sign(approx)).astype(jnp.int32),
        identity_abs_error=t["identity_abs_error"],
        weight_sum=jnp.float32(alphas.sum()),
        mean_subtract=jnp.float32(mean_subtract),
        feature_ids=jnp.asarray(active.astype(np.int32)),
        contributions=t["contributions"][active],
        feature_hidden_scores=t["scores"][active],
        query_feature_coeffs=t["coeff"][active],
    )


@pytree_dataclass
class QueryDecompositions:
    """B query decompositions with fixed shapes (the batched form of :class:`QueryDecomposition`).

    Scalars are (B,) arrays with the same meaning as there (``feature_sum`` = sum of the
    contributions). Per-feature terms are dense (B, D): ``contributions`` = beta_i (h . d_i),
    ``query_feature_coeffs`` = beta_i; a feature is active for query b where its coefficient
    is nonzero (``active_mask``), exactly the features :func:`decompose_query` lists.
    """

    exact_score: jax.Array
    base_term: jax.Array
    feature_sum: jax.Array
    approx_score: jax.Array
    residual: jax.Array
    sign_preserved: jax.Array
    identity_abs_error: jax.Array
    contributions: jax.Array
    query_feature_coeffs: jax.Array

    @property
    def active_mask(self) -> jax.Array:
        return self.query_feature_coeffs != 0

    def __len__(self) -> int:
        return int(self.exact_score.shape[0])

    def __repr__(self) -> str:
        return fields_repr("QueryDecompositions", [("queries", len(self)), ("contributions", shape_text(self.contributions))])


def _padded_queries(queries: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries -> (ids (B, T) int32, alphas (B, T) float32); padding is (id 0, alpha 0)."""
    if isinstance(queries, Mapping):
        queries = [queries] * batch
    if isinstance(queries, tuple) and len(queries) == 2 and not isinstance(queries[0], Mapping):
        ids = as_index_array(queries[0], name="query token ids", ndim=2)
        alphas = np.asarray(to_numpy(queries[1], name="query weights"), dtype=np.float32)
        if alphas.shape != ids.shape:
            raise ShapeError(f"query weights have shape {alphas.shape} but token ids {ids.shape}")
        if ids.shape[0] != batch:
            raise ShapeError(f"{ids.shape[0]} queries for {batch} hidden states")
        if not np.all(np.isfinite(alphas)):
            raise NonFiniteError("query weights hold NaN or Inf")
        return ids.astype(np.int32), alphas
    queries = list(queries)
    if len(queries) != batch:
        raise ShapeError(f"{len(queries)} queries for {batch} hidden states")
    pairs = [_weights_arrays(q) for q in queries]
    width = max(p[0].size for p in pairs)
    ids = np.zeros((batch, width), np.int32)
    alphas = np.zeros((batch, width), np.float32)
    for b, (i, a) in enumerate(pairs):
        ids[b, : i.size], alphas[b, : a.size] = i, a
    return ids, alphas


def _batched_query_terms(cfg, k, params, buffers, H, W, ids, alphas, exact_logits, mean, mean_subtract):
    rows = W[ids]  # (B, T, d)
    return jax.vmap(
        lambda h, r, a, lg, m: query_terms(cfg, k, params, buffers, h, r, a, lg, mean, m)
    )(H, rows, alphas, exact_logits, mean_subtract)


_batched_query_terms_jit = compiled(_batched_query_terms, static_argnums=(0, 1))


def decompose_queries(
    H: Any,
    queries: Any,
    model: Any,
    *,
    W_U: Any,
    row_mean: Any = None,
    mean_subtract: Any = 0.0,
    logits: Any = None,
    k: int | None = None,
) -> QueryDecompositions:
    """Decompose B linear queries over B hidden states in one jitted, vmapped call.

    ``H`` (B, d); ``queries`` one weight mapping for every row, a list of B mappings (from
    :func:`build_query_weights`; padded to a common width with zero weights, which add
    exactly nothing), or padded arrays (ids (B, T), alphas (B, T)); ``mean_subtract`` a
    scalar or (B,); ``logits`` (B, V) the caller's logits for ``exact`` (default h . W_U).
    Query b equals ``decompose_query(H[b], queries[b], ...)``.
    """
    cfg, params, buffers, d_model = inference_view(model)
    Ha = as_float_array(H, name="H", ndim=2)
    check_last_dim("H", Ha, d_model)
    W = as_float_array(W_U, name="W_U", ndim=2)
    check_last_dim("W_U", W, d_model)
    batch = int(Ha.shape[0])
    ids, alphas = _padded_queries(queries, batch)
    if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
        raise ShapeError(f"query token id outside the vocabulary [0, {W.shape[0]})")
    m = np.broadcast_to(np.asarray(to_numpy(mean_subtract, name="mean_subtract"), np.float32), (batch,))
    if not np.all(np.isfinite(m)):
        raise NonFiniteError("mean_subtract holds NaN or Inf")
    mean_a = centering_mean(row_mean, W, model, d_model)
    ids_j = jnp.asarray(ids)
    if logits is None:
        exact_logits = jnp.einsum("btd,bd->bt", W[ids_j], Ha, precision=HIGHEST)
    else:
        lg = as_float_array(logits, name="logits", ndim=2)
        if lg.shape != (batch, W.shape[0]):
            raise ShapeError(f"logits have shape {tuple(lg.shape)}, expected ({batch}, {W.shape[0]})")
        exact_logits = jnp.take_along_axis(lg, ids_j, axis=1)
    t = _batched_query_terms_jit(
        cfg, static_k(k), params, buffers, Ha, W, ids_j, jnp.asarray(alphas), exact_logits, mean_a,
        jnp.asarray(m),
    )
    exact, approx = t["exact"], t["approx"]
    return QueryDecompositions(
        exact_score=exact,
        base_term=t["base"],
        feature_sum=t["feature_sum"],
        approx_score=approx,
        residual=t["residual"],
        sign_preserved=(jnp.sign(exact) == jnp.sign(approx)).astype(jnp.int32),
        identity_abs_error=t["identity_abs_error"],
        contributions=t["contributions"],
        query_feature_coeffs=t["coeff"],
    )


__all__ = ["query_terms", "QueryDecomposition", "QueryDecompositions", "decompose_query", "decompose_queries", "centering_mean"]
