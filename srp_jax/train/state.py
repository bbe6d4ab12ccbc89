"""The train state: one pytree with stable names (sharding rules and Orbax key on them).

``TrainState`` fields: ``params`` / ``buffers`` (see :mod:`srp_jax.factorizers`),
``opt_state`` (optax), ``step`` (int32, updates done), ``rng`` (uint32[2] base key: the step
key is ``fold_in(rng, step)``, so resuming at any step replays the same draws),
``controller`` (``coeff``, ``l0_ema``, ``l0_ema_init``: the L0 controller),
``since_fired`` (D,) int32 (steps since each latent last fired, for AuxK / dead tracking),
``l0_sum`` / ``l0_count`` (the running mean L0 over the last 1000 steps).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import factorizers as F
from .._pytree import pytree_dataclass
from ..compile import compiled
from ..config import FactorizerConfig, TrainingConfig


@pytree_dataclass
class TrainState:
    params: Any
    opt_state: Any
    buffers: Any
    step: jax.Array
    rng: jax.Array
    controller: dict
    since_fired: jax.Array
    l0_sum: jax.Array
    l0_count: jax.Array


def controller_coeff_init(fcfg: FactorizerConfig, tcfg: TrainingConfig) -> float:
    c = tcfg.l0_controller
    if c.coeff_init is not None:
        return float(c.coeff_init)
    return float(tcfg.l0_coeff or tcfg.l1_coeff or 1e-4)


def controller_coeff_max(fcfg: FactorizerConfig, tcfg: TrainingConfig) -> float:
    c = tcfg.l0_controller
    if c.coeff_max is not None:
        return float(c.coeff_max)
    return float(fcfg.arch.controller_coeff_max)


ROW_SEED_SCALE_ROWS = 2048  # rows drawn (by the sampling weights) to fit the least-squares scale
ROW_SEED_SCALE_CHUNK = 512  # rows encoded at once while fitting it (bounds the (rows, D) block)


@partial(compiled, static_argnums=0)
def least_squares_scale(fcfg: FactorizerConfig, params: F.Params, buffers: F.Buffers, x: jax.Array) -> jax.Array:
    """s* = <x, y> / <y, y> over the rows ``x`` (n, d), y = decode(encode(x)) at the training k:
    the one factor on the encoder kernel that minimises ||x - s*y||^2 over the sample.

    With a zero bias the TopK family's encoder is positively homogeneous (ReLU then top-k
    picks the same support for any s > 0), so scaling the kernel by s* scales y by exactly
    s*; the initial MSE is then (1 - cos^2(x, y)) times predicting zero, never worse."""
    k = fcfg.resolve_k(fcfg.k)
    n = x.shape[0]
    chunk = min(ROW_SEED_SCALE_CHUNK, n)
    pad = (-n) % chunk  # zero rows add nothing to either sum
    blocks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])

    def sums(block):
        y = F.decode(params, F.encode(fcfg, params, buffers, block, k))
        return jnp.sum(block * y), jnp.sum(y * y)

    xy, yy = (jnp.sum(v) for v in jax.lax.map(sums, blocks))
    return jnp.where(yy > 0, jnp.maximum(xy, 0.0) / jnp.maximum(yy, 1e-30), 1.0)


def row_seeded_scale(
    fcfg: FactorizerConfig, tcfg: TrainingConfig, params: F.Params, buffers: F.Buffers, x: jax.Array
) -> jax.Array:
    """The factor on the tied encoder kernel (``training.row_seeded_scale``): ``least_squares``
    (:func:`least_squares_scale` on ``x``), ``inv_k`` (1/k), ``inv_sqrt_k`` (1/sqrt(k)) or a
    number (1.0 = the unscaled tie, whose initial reconstruction is far worse than zero)."""
    mode = tcfg.row_seeded_scale
    k = fcfg.resolve_k(fcfg.k)
    if mode == "least_squares":
        return least_squares_scale(fcfg, params, buffers, x)
    if mode == "inv_k":
        return jnp.float32(1.0 / k)
    if mode == "inv_sqrt_k":
        return jnp.float32(1.0 / np.sqrt(k))
    return jnp.float32(float(mode))


def init_params(
    key: jax.Array,
    fcfg: FactorizerConfig,
    tcfg: TrainingConfig,
    d_model: int,
    rows_normalized: Any = None,
    sample_weights: Any = None,
) -> tuple[F.Params, F.Buffers]:
    """Random init (the reference's), or ``row_seeded``: decoder rows = ``rows_normalized`` of
    D rows drawn by ``sample_weights`` without replacement (with replacement only when D > V),
    encoder kernel = s * decoder^T (tied at init, scaled by :func:`row_seeded_scale`; the fit
    uses ``ROW_SEED_SCALE_ROWS`` rows drawn with replacement by the same weights), bias 0.
    ``rows_normalized`` may have zero rows appended past the V of ``sample_weights``."""
    k_rand, k_rows = jax.random.split(key)
    params, buffers = F.init_factorizer(k_rand, fcfg, d_model)
    if tcfg.init_mode == "row_seeded":
        rows = jnp.asarray(rows_normalized, jnp.float32)
        # V from the weights when given: on a mesh the rows arrive zero-padded (never drawn)
        V = rows.shape[0] if sample_weights is None else int(np.shape(sample_weights)[0])
        D = fcfg.d_features
        p = None if sample_weights is None else jnp.asarray(np.asarray(sample_weights, np.float64), jnp.float32)
        idx = jax.random.choice(k_rows, V, (D,), replace=D > V, p=p)
        decoder = F.normalize_rows(rows[idx])
        tied = {**params, "decoder": decoder, "encoder": {"kernel": decoder.T, "bias": jnp.zeros((D,), jnp.float32)}}
        fit = rows[jax.random.choice(jax.random.fold_in(k_rows, 1), V, (ROW_SEED_SCALE_ROWS,), replace=True, p=p)]
        scale = row_seeded_scale(fcfg, tcfg, tied, buffers, fit)
        params = {**tied, "encoder": {"kernel": scale * decoder.T, "bias": tied["encoder"]["bias"]}}
    return params, buffers


def init_train_state(
    seed: int,
    fcfg: FactorizerConfig,
    tcfg: TrainingConfig,
    d_model: int,
    optimizer,
    rows_normalized: Any = None,
    sample_weights: Any = None,
) -> TrainState:
    """A fresh state: parameters from ``fold_in(PRNGKey(seed), 0)``, step keys from
    ``fold_in(PRNGKey(seed), 1)`` (stored as ``rng``)."""
    base = jax.random.PRNGKey(int(seed))
    params, buffers = init_params(jax.random.fold_in(base, 0), fcfg, tcfg, d_model, rows_normalized, sample_weights)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        buffers=buffers,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.fold_in(base, 1),
        controller={
            "coeff": jnp.asarray(controller_coeff_init(fcfg, tcfg), jnp.float32),
            "l0_ema": jnp.zeros((), jnp.float32),
            "l0_ema_init": jnp.zeros((), jnp.int32),
        },
        since_fired=jnp.zeros((fcfg.d_features,), jnp.int32),
        l0_sum=jnp.zeros((), jnp.float32),
        l0_count=jnp.zeros((), jnp.int32),
    )


__all__ = ["TrainState", "init_params", "least_squares_scale", "row_seeded_scale", "init_train_state", "controller_coeff_init", "controller_coeff_max"]
