"""JumpReLU (``jumprelu``): ``z = ReLU(xW + b) * 1[ReLU(xW + b) > exp(log_threshold)]``.

Training uses a rectangle-kernel straight-through estimator whose bandwidth is
``bandwidth`` x an EMA (0.99) of the RMS of the positive pre-activations (buffers
``act_scale_ema``, ``act_scale_init``); the aux term is the mean L0 of the mask, weighted by
``training.l0_coeff`` or the L0 controller. Decoder rows are not renormalised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels as K
from .base import Architecture, BufferSpec, FactorizerOutput, Option, float_option

EMA_MOMENTUM = 0.99


class JumpReLU(Architecture):
    name = "jumprelu"
    options = {
        "log_threshold_init": Option(-6.0, float_option(), "initial log threshold of every feature"),
        "bandwidth": Option(0.5, float_option(0.0, exclusive_minimum=True), "STE bandwidth, in units of the RMS EMA"),
    }
    extra_params = {"log_threshold": lambda cfg: cfg.log_threshold_init}
    buffers = {"act_scale_ema": BufferSpec("float32", 1.0), "act_scale_init": BufferSpec("int32", 0)}
    renormalize_decoder = False
    l0_controller = True
    controller_coeff_max = 0.01

    def encode(self, cfg, params, buffers, x, k):
        z = jax.nn.relu(K.pre_activation(params, x))
        return jnp.where(z - jnp.exp(params["log_threshold"]) > 0, z, 0.0)

    def forward(self, cfg, params, buffers, x, k, train):
        z = jax.nn.relu(K.pre_activation(params, x))
        scale = buffers["act_scale_ema"]
        new_buffers = buffers
        if train:
            ema, flag = K.ema_update(
                scale, buffers["act_scale_init"], jax.lax.stop_gradient(K.positive_rms(z)), EMA_MOMENTUM
            )
            new_buffers = {"act_scale_ema": ema, "act_scale_init": flag}
            scale = ema
        h = jnp.maximum(cfg.bandwidth * jax.lax.stop_gradient(scale), 1e-8)
        mask = K.rectangle_step(z - jnp.exp(params["log_threshold"]), h)
        code = z * mask
        aux = jnp.mean(jnp.sum(mask, axis=-1))
        return FactorizerOutput(K.decode(params, code), code, aux, None, jax.lax.stop_gradient(K.active_count(code)), new_buffers)

    def sparsity_penalty(self, training, terms, controller_coeff):
        coeff = training.l0_coeff if controller_coeff is None else controller_coeff
        return coeff * terms.aux


