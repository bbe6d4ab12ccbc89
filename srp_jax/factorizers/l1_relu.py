"""L1 ReLU (``l1_relu``): a dense ReLU code with a decoder-norm-weighted L1 penalty
``mean_b sum_i z_bi ||d_i||`` (weight ``training.l1_coeff`` or the L0 controller)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels as K
from .base import Architecture


class L1ReLU(Architecture):
    name = "l1_relu"
    l0_controller = True

    def encode(self, cfg, params, buffers, x, k):
        return jax.nn.relu(K.pre_activation(params, x))

    def aux_loss(self, cfg, params, code):
        dec_norms = jax.lax.stop_gradient(jnp.linalg.norm(params["decoder"], axis=1))
        return jnp.mean(jnp.sum(code * dec_norms, axis=-1))

    def sparsity_penalty(self, training, terms, controller_coeff):
        coeff = training.l1_coeff if controller_coeff is None else controller_coeff
        return coeff * terms.aux


