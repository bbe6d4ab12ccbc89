"""Logit decomposition: ``h . w_t = base + sum_i c_i + residual``.

For a row ``w_t`` with normalized row ``x_t``, norm ``a_t`` and code ``z_t = encode(x_t, k)``::

    w_t = mu + a_t * (z_t @ Dec) + r_t
    h . w_t = h . mu  +  sum_i a_t z_{t,i} (h . d_i)  +  h . r_t
            = base    +  feature_sum                  +  residual

General linear queries ``q = sum_t alpha_t w_t - m * mu`` decompose the same way with the
coefficient ``beta_i = sum_t alpha_t a_t z_{t,i}`` and base ``(sum alpha - m) (h . mu)``.

Everything numeric runs in jitted pure kernels (``token_terms``, ``query_terms``) that vmap;
the reference-parity entry points (``decompose_token_logit``, ``decompose_query``) validate
input, call the kernels and return concrete arrays. Nothing here gates: see
:mod:`srp_jax.gate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import factorizers as F
from ._arrays import as_float_array, as_index_array, check_last_dim, static_k, to_numpy
from .config import FactorizerConfig
from .errors import ConfigError, NonFiniteError, ShapeError
from .readout import ROW_NORM_EPS, resolve_row_mean

HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=HIGHEST)


# --------------------------------------------------------------------------------------------
# Single-token decomposition


@flax.struct.dataclass
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

    Returns original, base, contributions (D,), code (D,), feature_sum, residual,
    reconstructed and identity_error, computed in the reference's order of operations.
    """
    code = F.encode(cfg, params, buffers, row_normalized[None], k)[0]
    scores = _dot(params["decoder"], h)  # (D,) = h @ Dec^T
    contributions = row_norm * code * scores
    return {"contributions": contributions, "code": code,
            **_scalar_terms(params, h, w_row, row_mean, row_norm, code, contributions)}


def _scalar_terms(params, h, w_row, row_mean, row_norm, code, contributions) -> dict[str, jax.Array]:
    """original, base, feature_sum, residual, reconstructed and identity_error of one row."""
    decoded = F.decode(params, code[None])[0]
    residual_row = w_row - (row_mean + row_norm * decoded)
    original = _dot(h, w_row)
    base = _dot(h, row_mean)
    feature_sum = jnp.sum(contributions)
    residual = _dot(h, residual_row)
    return {
        "original": original,
        "base": base,
        "feature_sum": feature_sum,
        "residual": residual,
        "reconstructed": base + feature_sum,
        "identity_error": original - (base + feature_sum + residual),
    }


_token_terms_jit = jax.jit(token_terms, static_argnums=(0, 1))


def _dictionary_arrays(model: Any) -> tuple[FactorizerConfig, F.Params, F.Buffers, int]:
    """(config, params, buffers, d_model) of a Dictionary (or anything shaped like one)."""
    try:
        cfg, params, buffers, d_model = model.config, model.params, model.buffers, model.d_model
    except AttributeError:
        raise ConfigError(
            f"model must be a loaded dictionary (srp_jax.load_factorizer), got {type(model).__name__}"
        ) from None
    if getattr(model, "training", False) and cfg.architecture == "batch_topk":
        raise ConfigError("decompose a batch_topk dictionary in eval mode (call .eval() first)")
    F.check_ready(cfg, buffers)
    return cfg, params, buffers, int(d_model)


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
    cfg, params, buffers, d_model = _dictionary_arrays(model)
    h_a = _vector(h, "h", "h must be a single hidden vector", d_model)
    w_a = _vector(W_row, "W_row", "W_row must be a single unembedding row", d_model)
    mean_a = _vector(row_mean, "row_mean", "row_mean must be a vector", d_model)
    x_a = _vector(row_normalized, "row_normalized", "row_normalized must be a single row", d_model)
    norm_a = as_float_array(row_norm, name="row_norm")
    if norm_a.size != 1:
        raise ShapeError(f"row_norm must be a scalar, got shape {tuple(norm_a.shape)}")
    terms = _token_terms_jit(cfg, static_k(k), params, buffers, h_a, w_a, mean_a, norm_a.reshape(()), x_a)
    active = np.flatnonzero(np.asarray(terms["code"]) != 0).astype(np.int32)
    return Decomposition(
        original_logit=terms["original"],
        base_term=terms["base"],
        feature_contributions=terms["contributions"],
        feature_sum=terms["feature_sum"],
        residual_term=terms["residual"],
        reconstructed_logit=terms["reconstructed"],
        identity_error=terms["identity_error"],
        active_feature_indices=jnp.asarray(active),
    )


def _vector(x: Any, name: str, rank_message: str, d_model: int) -> jax.Array:
    arr = as_float_array(x, name=name)
    if arr.ndim != 1:
        raise ShapeError(f"{rank_message}: {name} has shape {tuple(arr.shape)}, expected ({d_model},)")
    check_last_dim(name, arr, d_model)
    return arr


# --------------------------------------------------------------------------------------------
# Batched token decomposition


@flax.struct.dataclass
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
    scores = _dot(rows, h)
    contributions = jnp.where(valid, row_norm * vals * scores, 0.0)
    return {
        "contributions": contributions,
        "indices": jnp.where(valid, idx, -1).astype(jnp.int32),
        "n_active": n_active,
        "truncated": n_active > m,
        **_scalar_terms(params, h, w_row, row_mean, row_norm, code, contributions),
    }


@partial(jax.jit, static_argnums=(0, 1, 2))
def _batched_terms(cfg, k, m, params, buffers, h, w_rows, row_mean, row_norms, rows_normalized):
    if m is None:
        fn = lambda *a: token_terms(cfg, k, params, buffers, *a)  # noqa: E731
    else:
        fn = lambda *a: _sparse_terms(cfg, k, m, params, buffers, *a)  # noqa: E731
    return jax.vmap(fn, in_axes=(0, 0, None, 0, 0))(h, w_rows, row_mean, row_norms, rows_normalized)


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
    contributions and gathers only those decoder rows (see :class:`TokenDecompositions`).
    """
    cfg, params, buffers, d_model = _dictionary_arrays(model)
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
    k_static = static_k(k)
    m = None
    if sparse:
        if cfg.architecture in ("topk", "matryoshka_topk"):
            m = min(cfg.resolve_k(k_static), cfg.d_features)
        elif max_active is None:
            raise ConfigError(f"sparse decomposition of a {cfg.architecture} dictionary needs max_active=")
        if max_active is not None:
            if isinstance(max_active, bool) or not isinstance(max_active, (int, np.integer)) or max_active < 1:
                raise ConfigError(f"max_active must be a positive integer, got {max_active!r}")
            m = min(int(max_active), cfg.d_features)
    t = _batched_terms(cfg, k_static, m, params, buffers, h_a, w_a, mean_a, norms_a, x_a)
    if m is None:
        n_active = jnp.sum(t["code"] != 0, axis=-1)
        return TokenDecompositions(
            t["original"], t["base"], t["feature_sum"], t["residual"], t["reconstructed"],
            t["identity_error"], n_active, t["contributions"],
        )
    return TokenDecompositions(
        t["original"], t["base"], t["feature_sum"], t["residual"], t["reconstructed"],
        t["identity_error"], t["n_active"], t["contributions"], t["indices"], t["truncated"],
    )


def decompose_tokens(
    h: Any,
    token_ids: Any,
    readout: Any,
    model: Any,
    k: int | None = None,
    *,
    sparse: bool = False,
    max_active: int | None = None,
) -> TokenDecompositions:
    """Decompose the logits of vocabulary ``token_ids`` (B,) under hidden states h (B, d).

    ``readout`` is a :class:`srp_jax.readout.Readout` prepared with the dictionary's row mean
    (``Readout.for_dictionary``). One jitted call for the whole batch.
    """
    ids = as_index_array(token_ids, name="token_ids", ndim=1)
    pos = jnp.asarray(readout.positions(ids))
    return decompose_rows(
        h, readout.W_U[pos], readout.row_mean, readout.row_norms[pos], readout.rows_normalized[pos],
        model, k, sparse=sparse, max_active=max_active,
    )


def batch_decomposition_identity_error(h, W_rows, row_mean, row_norms, rows_normalized, model, k=None) -> jax.Array:
    """|identity error| (B,) of the pairs (h[i], W_rows[i]) (the reference helper)."""
    return jnp.abs(decompose_rows(h, W_rows, row_mean, row_norms, rows_normalized, model, k).identity_error)


# --------------------------------------------------------------------------------------------
# General linear queries (method.md 3.3a)

QUERY_KINDS = (
    "selected_token",
    "target_vs_vocab_mean",
    "pairwise_margin",
    "token_family_margin",
    "winner_vs_topk",
    "winner_vs_rank",
)


def resolve_single_token(tokenizer: Any, raw: str) -> int | None:
    """One token id for a token string: try ``" " + raw`` first (unless it starts with a
    space), then ``raw``; success needs exactly one id (no special tokens). Else None."""
    candidates = [raw] if raw.startswith(" ") else [" " + raw, raw]
    for text in candidates:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    return None


def _token_id(token: Any, tokenizer: Any, role: str) -> int | None:
    if isinstance(token, str):
        if tokenizer is None:
            raise ConfigError(f"{role} {token!r} is a string: pass tokenizer= to resolve it")
        return resolve_single_token(tokenizer, token)
    if not isinstance(token, (bool, np.bool_)) and not isinstance(token, (int, np.integer)):
        # a 0-d integer array of any framework (jnp.argmax(...), torch.argmax(...), np.int64)
        if getattr(token, "shape", None) is not None and len(token.shape) == 0:
            value = to_numpy(token, name=role)
            if np.issubdtype(value.dtype, np.integer):
                token = int(value)
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
        raise ConfigError(f"{role} must be a token id or a token string, got {token!r}")
    if int(token) < 0:
        raise ConfigError(f"{role} must be a non-negative token id, got {token}")
    return int(token)


def _merge(weights: dict[int, float], tid: int, value: float) -> None:
    weights[tid] = float(weights.get(tid, 0.0) + value)


def build_query_weights(
    query_kind: str,
    *,
    target: Any = None,
    target_a: Any = None,
    target_b: Any = None,
    target_family: Sequence[Any] = (),
    contrast_family: Sequence[Any] = (),
    logits: Any = None,
    top_competitors: int = 10,
    competitor_rank: int = 5,
    tokenizer: Any = None,
) -> tuple[dict[int, float], float, dict[str, Any]]:
    """Token weights alpha, the mean-subtraction weight m, and metadata for a query kind.

    | kind | alpha | m |
    | selected_token | {t: 1} | 0 |
    | target_vs_vocab_mean | {t: 1} | 1 |
    | pairwise_margin | {A: +1} merged with {B: -1} (A == B gives weight 0) | 0 |
    | token_family_margin | +1/|A| per A token, -1/|B| per B token, merged | 0 |
    | winner_vs_topk | argmax +1; the next ``top_competitors`` tokens -softmax(their logits) | 0 |
    | winner_vs_rank | argmax +1; the token at rank max(2, ``competitor_rank``) -1 | 0 |

    Tokens are ids, or strings resolved with ``tokenizer`` (unresolvable family members are
    dropped; an unresolvable single target is an error). ``logits`` (V,) are needed by the
    winner kinds.
    """
    weights: dict[int, float] = {}
    meta: dict[str, Any] = {"query_kind": query_kind}
    if query_kind in ("selected_token", "target_vs_vocab_mean"):
        tid = _token_id(target, tokenizer, "target")
        if tid is None:
            raise ConfigError(f"{query_kind}: target {target!r} did not resolve to a single token")
        weights[tid] = 1.0
        meta["target_token_id"] = tid
        return weights, (1.0 if query_kind == "target_vs_vocab_mean" else 0.0), meta
    if query_kind == "pairwise_margin":
        aid = _token_id(target_a, tokenizer, "target_a")
        bid = _token_id(target_b, tokenizer, "target_b")
        if aid is None or bid is None:
            raise ConfigError(f"pairwise_margin: {target_a!r} / {target_b!r} did not resolve to single tokens")
        weights[aid] = 1.0
        _merge(weights, bid, -1.0)
        meta.update(target_token_id=aid, contrast_token_ids=[bid])
        return weights, 0.0, meta
    if query_kind == "token_family_margin":
        a_ids = [t for t in (_token_id(x, tokenizer, "target_family") for x in target_family) if t is not None]
        b_ids = [t for t in (_token_id(x, tokenizer, "contrast_family") for x in contrast_family) if t is not None]
        if not a_ids or not b_ids:
            raise ConfigError("token_family_margin: a token family is empty after resolving its tokens")
        for tid in a_ids:
            _merge(weights, tid, 1.0 / len(a_ids))
        for tid in b_ids:
            _merge(weights, tid, -1.0 / len(b_ids))
        meta.update(target_token_ids=a_ids, contrast_token_ids=b_ids)
        return weights, 0.0, meta
    if query_kind in ("winner_vs_topk", "winner_vs_rank"):
        if logits is None:
            raise ConfigError(f"{query_kind} needs logits=")
        lg = np.asarray(as_float_array(logits, name="logits", ndim=1))
        if query_kind == "winner_vs_topk":
            count = min(max(2, int(top_competitors) + 1), lg.shape[0])
        else:
            count = min(max(2, int(competitor_rank)), lg.shape[0])
        vals, ids = jax.lax.top_k(jnp.asarray(lg), count)
        vals, ids = np.asarray(vals), np.asarray(ids)
        winner = int(ids[0])
        weights[winner] = 1.0
        meta["target_token_id"] = winner
        if query_kind == "winner_vs_topk":
            comp_ids = [int(t) for t in ids[1: int(top_competitors) + 1]]
            comp_w = np.asarray(jax.nn.softmax(jnp.asarray(vals[1: int(top_competitors) + 1], jnp.float32)))
            for tid, w in zip(comp_ids, comp_w.tolist()):
                _merge(weights, tid, -float(w))
            meta.update(
                contrast_token_ids=comp_ids,
                competitor_weight_entropy=float(-(comp_w * np.log(np.maximum(comp_w, 1e-12))).sum()),
            )
        else:
            competitor = int(ids[-1])
            _merge(weights, competitor, -1.0)
            meta.update(contrast_token_ids=[competitor], competitor_rank=count, competitor_logit=float(vals[-1]))
        return weights, 0.0, meta
    raise ConfigError(f"unknown query kind {query_kind!r} (expected one of: {', '.join(QUERY_KINDS)})")


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
    centered = rows - row_mean
    norms = jnp.maximum(jnp.sqrt(jnp.sum(centered * centered, axis=-1)), ROW_NORM_EPS)
    x = centered / norms[:, None]
    z = F.encode(cfg, params, buffers, x, k)
    coeff = jnp.sum(alphas[:, None] * norms[:, None] * z, axis=0)
    scores = _dot(params["decoder"], h)
    contributions = coeff * scores
    h_mean = _dot(h, row_mean)
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
        "identity_abs_error": jnp.abs(_dot(h, query_row) - exact),
    }


_query_terms_jit = jax.jit(query_terms, static_argnums=(0, 1))


@flax.struct.dataclass
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


def _centering_mean(row_mean: Any, W: jax.Array, model: Any, d_model: int) -> jax.Array:
    """The given ``row_mean``, else the dictionary's stored one (``resolve_row_mean`` order)."""
    if row_mean is None:
        return resolve_row_mean(W, ckpt=model)
    return _vector(row_mean, "row_mean", "row_mean must be a vector", d_model)


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
    cfg, params, buffers, d_model = _dictionary_arrays(model)
    h_a = _vector(h, "h", "h must be a single hidden vector", d_model)
    W = as_float_array(W_U, name="W_U", ndim=2)
    check_last_dim("W_U", W, d_model)
    ids, alphas = _weights_arrays(weights)
    if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
        raise ShapeError(f"query token id outside the vocabulary [0, {W.shape[0]})")
    mean_a = _centering_mean(row_mean, W, model, d_model)
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


@flax.struct.dataclass
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


_batched_query_terms_jit = jax.jit(_batched_query_terms, static_argnums=(0, 1))


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
    cfg, params, buffers, d_model = _dictionary_arrays(model)
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
    mean_a = _centering_mean(row_mean, W, model, d_model)
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


# --------------------------------------------------------------------------------------------
# Row-by-row margins (method.md 3.3b)

VOCAB_MEAN = -1  # a side of -1 means "the vocabulary mean row" (mu)


@flax.struct.dataclass
class MarginDecomposition:
    """Margin A - B decomposed row by row (each side the uniform mean of its rows' terms).

    ``exact`` = o_A - o_B, ``sparse`` = s_A - s_B (the bases cancel: both sides weigh 1),
    ``residual`` = exact - sparse, ``resid_term`` = r_A - r_B (equal to ``residual`` up to
    round-off), ``feat_margin`` (D,) = f_A - f_B per-feature margin contributions.
    """

    exact: jax.Array
    sparse: jax.Array
    residual: jax.Array
    resid_term: jax.Array
    feat_margin: jax.Array


def _side_terms(cfg, k, params, buffers, h, W, mu, ids):
    """Uniform mean of (original, reconstructed, residual, contributions) over one side's rows."""
    rows = W[ids]
    centered = rows - mu
    norms = jnp.maximum(jnp.sqrt(jnp.sum(centered * centered, axis=-1)), ROW_NORM_EPS)
    x = centered / norms[:, None]
    t = jax.vmap(lambda w, a, xr: token_terms(cfg, k, params, buffers, h, w, mu, a, xr))(rows, norms, x)
    return (
        jnp.mean(t["original"]),
        jnp.mean(t["reconstructed"]),
        jnp.mean(t["residual"]),
        jnp.mean(t["contributions"], axis=0),
    )


def _mean_row_terms(cfg, k, params, buffers, h, mu):
    """The vocabulary-mean pseudo-row decomposed like a token row: centered 0, norm 1e-8."""
    t = token_terms(cfg, k, params, buffers, h, mu, mu, jnp.float32(ROW_NORM_EPS), jnp.zeros_like(mu))
    return t["original"], t["reconstructed"], t["residual"], t["contributions"]


def margin_from_rows(
    h: Any,
    side_a: Any,
    side_b: Any,
    model: Any,
    *,
    W_U: Any,
    row_mean: Any = None,
    k: int | None = None,
) -> MarginDecomposition:
    """Decompose the margin between token sides A and B row by row.

    Each side is a token id, a list of ids (a family: uniform mean over its rows) or
    ``VOCAB_MEAN`` (-1): the row mu itself, decomposed as a row (its normalized row is 0 and
    its norm clamps to 1e-8, so every term but the original is ~1e-8 of a logit).
    """
    cfg, params, buffers, d_model = _dictionary_arrays(model)
    h_a = _vector(h, "h", "h must be a single hidden vector", d_model)
    W = as_float_array(W_U, name="W_U", ndim=2)
    check_last_dim("W_U", W, d_model)
    mu = _centering_mean(row_mean, W, model, d_model)
    k_static = static_k(k)

    def side(spec, name):
        ids = np.atleast_1d(as_index_array(spec, name=name))
        if ids.size == 0:
            raise ShapeError(f"{name} is empty")
        if np.any(ids == VOCAB_MEAN):
            if ids.size != 1:
                raise ShapeError(f"{name}: the vocabulary mean (-1) cannot be mixed with token ids")
            return _mean_row_jit(cfg, k_static, params, buffers, h_a, mu)
        if ids.min() < 0 or ids.max() >= W.shape[0]:
            raise ShapeError(f"{name}: token id outside the vocabulary [0, {W.shape[0]})")
        return _side_jit(cfg, k_static, params, buffers, h_a, W, mu, jnp.asarray(ids))

    oa, sa, ra, fa = side(side_a, "side_a")
    ob, sb, rb, fb = side(side_b, "side_b")
    exact = oa - ob
    sparse = sa - sb
    return MarginDecomposition(exact, sparse, exact - sparse, ra - rb, fa - fb)


_side_jit = jax.jit(_side_terms, static_argnums=(0, 1))
_mean_row_jit = jax.jit(_mean_row_terms, static_argnums=(0, 1))


def coverage_stats(feat_margin: Any, sparse_margin: float, eps: float = 1e-6) -> dict[str, Any]:
    """How concentrated a margin's feature contributions are (the run scripts' statistics).

    top{5,10}_signed_cov = (sum of the top-n contributions by |.|) / sparse_margin (0 when
    |sparse_margin| <= 1e-6); top{5,10}_abs_cov = their |.| sum / total |.| (0 when the total
    <= eps); n_feat_80pct_abs = features needed to pass 80 % of the |.| mass; the largest
    positive and negative contributions over the full vector (zeros included).
    """
    f = np.asarray(to_numpy(feat_margin, name="feat_margin"), dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ShapeError(f"feat_margin must be a non-empty vector (D,), got shape {f.shape}")
    absf = np.abs(f)
    order = np.argsort(-absf, kind="stable")
    total = float(absf.sum())
    out: dict[str, Any] = {}
    for n in (5, 10):
        top = order[:n]
        out[f"top{n}_signed_cov"] = float(f[top].sum() / sparse_margin) if abs(sparse_margin) > 1e-6 else 0.0
        out[f"top{n}_abs_cov"] = float(absf[top].sum() / total) if total > eps else 0.0
    if total > eps:
        share = np.cumsum(absf[order]) / total
        out["n_feat_80pct_abs"] = int(np.sum(share < 0.8) + 1)
    else:
        out["n_feat_80pct_abs"] = 0
    out["largest_pos_feat"] = int(np.argmax(f))
    out["largest_pos_contrib"] = float(f[np.argmax(f)])
    out["largest_neg_feat"] = int(np.argmin(f))
    out["largest_neg_contrib"] = float(f[np.argmin(f)])
    return out


__all__ = [
    "Decomposition",
    "TokenDecompositions",
    "QueryDecomposition",
    "QueryDecompositions",
    "MarginDecomposition",
    "QUERY_KINDS",
    "VOCAB_MEAN",
    "token_terms",
    "query_terms",
    "decompose_token_logit",
    "decompose_rows",
    "decompose_tokens",
    "batch_decomposition_identity_error",
    "resolve_single_token",
    "build_query_weights",
    "decompose_query",
    "decompose_queries",
    "margin_from_rows",
    "coverage_stats",
]
