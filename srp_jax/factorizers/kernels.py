"""Kernels every architecture shares: top-k, encoder pre-activation, decode, row norms, MSE,
the rectangle straight-through step and the buffer EMA. Pure jnp; no architecture knowledge.

Top-k ties: ``jax.lax.top_k`` keeps the **lower feature index** among exactly equal values
(``torch.topk`` leaves the order implementation-defined; supports can differ only at exact
ties). Matmuls that decide supports run at ``precision=HIGHEST`` so accelerators reproduce the
float32 reference. Under a mesh whose ``model`` axis shards D, :func:`topk_mask` and
:func:`batch_topk_mask` take the latent-sharded kernels of :mod:`.sharded_topk` (same
selection, ties included, without gathering the (B, D) activation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import sharded_topk as S

HIGHEST = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-8

Params = dict[str, Any]
Buffers = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Rows


def normalize_rows(matrix: jax.Array) -> jax.Array:
    """Divide each row by max(||row||_2, 1e-8)."""
    norms = jnp.sqrt(jnp.sum(jnp.square(matrix), axis=-1, keepdims=True))
    return matrix / jnp.maximum(norms, NORM_EPS)


def normalize_decoder(params: Params) -> Params:
    """The reference's ``normalize_decoder_``: unit-norm decoder rows (floor 1e-8)."""
    return {**params, "decoder": normalize_rows(params["decoder"])}


def init_encoder_decoder(key: jax.Array, d_features: int, d_model: int, encoder_init_scale: float) -> Params:
    """The reference's shared initialisation: encoder kernel (d, D) ~ N(0, scale), bias 0,
    decoder (D, d) ~ N(0, d^-1/2) with unit-norm rows."""
    d, D = int(d_model), int(d_features)
    k_enc, k_dec = jax.random.split(key)
    return {
        "encoder": {
            "kernel": encoder_init_scale * jax.random.normal(k_enc, (d, D), jnp.float32),
            "bias": jnp.zeros((D,), jnp.float32),
        },
        "decoder": normalize_rows(jax.random.normal(k_dec, (D, d), jnp.float32) * d ** -0.5),
    }


# --------------------------------------------------------------------------------------------
# Top-k


def topk_sparse(acts: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest entries per row: ``(values (..., k), indices (..., k))``.

    Ties go to the lower index. ``k`` must satisfy 1 <= k <= acts.shape[-1]. (Inside
    :func:`~srp_jax.factorizers.sharded_topk.approximate_topk`: ``approx_max_k``.)
    """
    return S.local_top_k(acts, k)


def scatter_rows(values: jax.Array, indices: jax.Array, width: int) -> jax.Array:
    """Dense (..., width) rows holding ``values`` at ``indices`` and zeros elsewhere."""
    lead = values.shape[:-1]
    flat_vals = values.reshape(-1, values.shape[-1])
    flat_idx = indices.reshape(-1, indices.shape[-1])
    rows = jnp.arange(flat_vals.shape[0])[:, None]
    dense = jnp.zeros((flat_vals.shape[0], width), values.dtype).at[rows, flat_idx].set(flat_vals)
    return dense.reshape(*lead, width)


def topk_mask(acts: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` largest activations per row and zero the rest (``k >= D``: unchanged).

    ``k <= 0`` gives an all-zero code (the raw ``encode_topk`` behaviour of the reference).
    """
    D = acts.shape[-1]
    kk = min(int(k), D)
    if kk >= D:
        return acts
    if kk <= 0:
        return jnp.zeros_like(acts)
    if S.rows_sharded(acts):  # on a mesh: never gather the (B, D) activation
        return jnp.where(S.topk_rows_mask(acts, kk), acts, jnp.zeros((), acts.dtype))
    values, indices = topk_sparse(acts, kk)
    return scatter_rows(values, indices, D)


def batch_topk_mask(acts: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The ``n`` (1 <= n <= B·D) largest entries of the whole batch ``acts`` (B, D): a float
    0/1 mask (B, D) and the cutoff (the smallest kept value, no gradient). Ties go to the
    lower flat index b·D + j (``lax.top_k`` of the flattened batch), on a mesh too."""
    if S.batch_sharded(acts):
        mask, cutoff = S.topk_batch_mask(acts, n)
        return mask.astype(acts.dtype), cutoff
    flat = acts.reshape(-1)
    values, indices = topk_sparse(flat, n)
    mask = jnp.zeros_like(flat).at[indices].set(1.0).reshape(acts.shape)
    return mask, jax.lax.stop_gradient(jnp.min(values))


# --------------------------------------------------------------------------------------------
# Encode / decode


def pre_activation(params: Params, x: jax.Array, *, bias: bool = True) -> jax.Array:
    """x @ kernel (+ bias) at HIGHEST precision: (B, d) -> (B, D)."""
    z = jnp.matmul(x, params["encoder"]["kernel"], precision=HIGHEST)
    return z + params["encoder"]["bias"] if bias else z


def decode(params: Params, code: jax.Array) -> jax.Array:
    """code @ decoder: (B, D) -> (B, d). No decoder bias (the row mean is the only offset)."""
    return jnp.matmul(code, params["decoder"], precision=HIGHEST)


def decode_sparse(params: Params, values: jax.Array, indices: jax.Array) -> jax.Array:
    """Decode from the active (value, index) pairs only: (B, k), (B, k) -> (B, d).

    Touches k decoder rows per example instead of D; equal to ``decode`` of the scattered code.
    """
    rows = jnp.take(params["decoder"], indices, axis=0)  # (B, k, d)
    return jnp.einsum("bk,bkd->bd", values, rows, precision=HIGHEST)


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over all B*d elements (``F.mse_loss``)."""
    return jnp.mean(jnp.square(a - b))


def active_count(code: jax.Array) -> jax.Array:
    """Mean number of positive entries per row (the reference's measured L0), float32."""
    return jnp.mean(jnp.sum((code > 0).astype(jnp.float32), axis=-1))


# --------------------------------------------------------------------------------------------
# Straight-through step and buffer EMAs


@jax.custom_vjp
def rectangle_step(u: jax.Array, h: jax.Array) -> jax.Array:
    """Heaviside 1[u > 0] whose backward is the rectangle kernel 1[|u| <= h/2] / max(h, 1e-12)."""
    return (u > 0).astype(u.dtype)


def _rectangle_fwd(u, h):
    return rectangle_step(u, h), (u, h)


def _rectangle_bwd(res, g):
    u, h = res
    kernel = (jnp.abs(u) <= h / 2).astype(u.dtype) / jnp.maximum(h, 1e-12)
    return g * kernel, jnp.zeros_like(h)


rectangle_step.defvjp(_rectangle_fwd, _rectangle_bwd)


def positive_rms(z: jax.Array) -> jax.Array:
    """sqrt(mean(z[z > 0]^2)) over the whole batch; 1.0 when nothing is positive."""
    pos = z > 0
    n = jnp.sum(pos)
    mean_sq = jnp.sum(jnp.where(pos, z * z, 0.0)) / jnp.maximum(n, 1)
    return jnp.where(n > 0, jnp.sqrt(mean_sq), 1.0).astype(jnp.float32)


def ema_update(value, initialized, new, momentum):
    """First call copies ``new``; later calls blend ``momentum * value + (1 - momentum) * new``.
    Returns (value, initialized-flag)."""
    blended = momentum * value + (1.0 - momentum) * new
    return jnp.where(initialized == 0, new, blended).astype(jnp.float32), jnp.ones_like(initialized)


__all__ = [
    "HIGHEST",
    "NORM_EPS",
    "Params",
    "Buffers",
    "normalize_rows",
    "normalize_decoder",
    "init_encoder_decoder",
    "topk_sparse",
    "scatter_rows",
    "topk_mask",
    "batch_topk_mask",
    "pre_activation",
    "decode",
    "decode_sparse",
    "mse",
    "active_count",
    "rectangle_step",
    "positive_rms",
    "ema_update",
]
