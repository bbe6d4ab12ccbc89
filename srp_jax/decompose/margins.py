"""Row-by-row margins A - B (method.md 3.3b) and how concentrated their contributions are."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import as_float_array, as_index_array, check_last_dim, static_k, to_numpy
from .._display import fields_repr, scalar_text, shape_text
from .._pytree import pytree_dataclass
from ..compile import compiled
from ..dictionary import inference_view
from ..errors import ShapeError
from ..readout import ROW_NORM_EPS, center_normalize
from .linear import centering_mean
from .token import token_terms, vector_arg

VOCAB_MEAN = -1  # a side of -1 means "the vocabulary mean row" (mu)


@pytree_dataclass
class MarginDecomposition:
    """Margin A - B decomposed row by row (each side the uniform mean of its rows' terms).

    ``exact`` = o_A - o_B, ``sparse`` = s_A - s_B (the bases cancel: both sides weigh 1),
    ``residual`` = exact - sparse, ``resid_term`` = r_A - r_B (equal to ``residual`` up to
    round-off; also readable as ``residual_term``, the name the other result types use),
    ``feat_margin`` (D,) = f_A - f_B per-feature margin contributions.
    """

    exact: jax.Array
    sparse: jax.Array
    residual: jax.Array
    resid_term: jax.Array
    feat_margin: jax.Array

    @property
    def residual_term(self) -> jax.Array:
        return self.resid_term

    def __repr__(self) -> str:
        return fields_repr("MarginDecomposition", [
            ("exact", scalar_text(self.exact)), ("sparse", scalar_text(self.sparse)),
            ("residual", scalar_text(self.residual)), ("feat_margin", shape_text(self.feat_margin)),
        ])  # fmt: skip


def _side_terms(cfg, k, params, buffers, h, W, mu, ids):
    """Uniform mean of (original, reconstructed, residual, contributions) over one side's rows."""
    rows = W[ids]
    norms, x = center_normalize(rows, mu)
    t = jax.vmap(lambda w, a, xr: token_terms(cfg, k, params, buffers, h, w, mu, a, xr))(rows, norms, x)
    return (
        jnp.mean(t["original"]),
        jnp.mean(t["reconstructed"]),
        jnp.mean(t["residual_term"]),
        jnp.mean(t["contributions"], axis=0),
    )


def _mean_row_terms(cfg, k, params, buffers, h, mu):
    """The vocabulary-mean pseudo-row decomposed like a token row: centered 0, norm 1e-8."""
    t = token_terms(cfg, k, params, buffers, h, mu, mu, jnp.float32(ROW_NORM_EPS), jnp.zeros_like(mu))
    return t["original"], t["reconstructed"], t["residual_term"], t["contributions"]


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
    cfg, params, buffers, d_model = inference_view(model)
    h_a = vector_arg(h, "h", "h must be a single hidden vector", d_model)
    W = as_float_array(W_U, name="W_U", ndim=2)
    check_last_dim("W_U", W, d_model)
    mu = centering_mean(row_mean, W, model, d_model)
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


_side_jit = compiled(_side_terms, static_argnums=(0, 1))
_mean_row_jit = compiled(_mean_row_terms, static_argnums=(0, 1))


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


__all__ = ["VOCAB_MEAN", "MarginDecomposition", "margin_from_rows", "coverage_stats"]
