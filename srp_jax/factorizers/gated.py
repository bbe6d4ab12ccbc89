"""Gated (``gated``, weight-tied): a hard gate ``1[xW + gate_bias > 0]`` times a magnitude
``ReLU(exp(log_r) xW + b)`` (``encoder.bias`` is the magnitude bias).

The aux term is the mean L1 of ReLU(gate pre-activation) (``training.gate_l1_coeff``) and an
auxiliary reconstruction of x from the gate activations through a stop-gradient decoder
(``training.gated_aux_coeff``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels as K
from .base import Architecture, FactorizerOutput


def gated_parts(params, x):
    """(code, gate pre-activation) of rows x (B, d)."""
    z = K.pre_activation(params, x, bias=False)
    gate_pre = z + params["gate_bias"]
    mag = jax.nn.relu(jnp.exp(params["log_r"]) * z + params["encoder"]["bias"])
    return jnp.where(gate_pre > 0, mag, 0.0), gate_pre


class Gated(Architecture):
    name = "gated"
    extra_params = {"gate_bias": lambda cfg: 0.0, "log_r": lambda cfg: 0.0}

    def encode(self, cfg, params, buffers, x, k):
        return gated_parts(params, x)[0]

    def forward(self, cfg, params, buffers, x, k, train):
        code, gate_pre = gated_parts(params, x)
        gate_act = jax.nn.relu(gate_pre)
        aux = jnp.mean(jnp.sum(gate_act, axis=-1))
        aux_recon = jnp.matmul(gate_act, jax.lax.stop_gradient(params["decoder"]), precision=K.HIGHEST)
        mean_l0 = K.active_count(gate_pre)  # the gate decides what is active
        return FactorizerOutput(K.decode(params, code), code, aux, aux_recon, jax.lax.stop_gradient(mean_l0), buffers)

    def sparsity_penalty(self, training, terms, controller_coeff):
        return training.gate_l1_coeff * terms.aux + training.gated_aux_coeff * terms.aux_recon_mse


