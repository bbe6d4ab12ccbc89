"""BatchTopK (``batch_topk``): the top B*k activations of the whole batch in training; in eval
a per-activation threshold, an EMA (momentum ``threshold_momentum``) of the batch cutoffs.

Buffers ``activation_threshold`` (f32) and ``threshold_initialized`` (flag). Eval mode before
any training-mode batch raises :class:`~srp_jax.errors.ThresholdNotReadyError` (spec decision 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ThresholdNotReadyError
from . import kernels as K
from .base import Architecture, BufferSpec, FactorizerOutput, Option, float_option


class BatchTopK(Architecture):
    name = "batch_topk"
    uses_k = True
    encode_depends_on_mode = True
    options = {"threshold_momentum": Option(0.995, float_option(0.0, 1.0), "EMA momentum of the eval threshold")}
    buffers = {"activation_threshold": BufferSpec("float32", 0.0), "threshold_initialized": BufferSpec("int32", 0)}

    def encode(self, cfg, params, buffers, x, k):
        acts = jax.nn.relu(K.pre_activation(params, x))
        return jnp.where(acts > buffers["activation_threshold"], acts, 0.0)

    def forward(self, cfg, params, buffers, x, k, train):
        if not train:
            return super().forward(cfg, params, buffers, x, k, train)
        acts = jax.nn.relu(K.pre_activation(params, x))
        B, D = acts.shape
        n_keep = min(B * min(cfg.resolve_k(k), D), B * D)
        if n_keep <= 0:
            code, new_buffers = jnp.zeros_like(acts), buffers
        else:
            mask, cutoff = K.batch_topk_mask(acts, n_keep)
            code = acts * mask
            thr, flag = K.ema_update(
                buffers["activation_threshold"], buffers["threshold_initialized"], cutoff, cfg.threshold_momentum
            )
            new_buffers = {"activation_threshold": thr, "threshold_initialized": flag}
        zero = jnp.zeros((), jnp.float32)
        return FactorizerOutput(K.decode(params, code), code, zero, None, jax.lax.stop_gradient(K.active_count(code)), new_buffers)

    def check_ready(self, cfg, buffers):
        flag = buffers.get("threshold_initialized")
        if isinstance(flag, jax.core.Tracer):
            return
        if flag is None or int(np.asarray(flag)) == 0:
            raise ThresholdNotReadyError(
                "batch_topk has no activation threshold yet (threshold_initialized == 0): "
                "run at least one training-mode encode before eval-mode encoding"
            )


