"""TopK (``topk``) and Matryoshka TopK (``matryoshka_topk``): ReLU, then the k largest per row.

``z = TopK_k(ReLU(x W + b))``: zeros outside the top k, ``k >= D`` the dense ReLU, k 0/None
the trained k. Matryoshka shares the encoder and trains on the weighted mean of the MSEs at
several budgets ``k_values`` (weights ``matryoshka_weights``; all ones when the lengths differ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels as K
from . import sparse as S
from .base import Architecture, LossTerms, Option, SparseLossTerms, float_tuple_option, int_tuple_option


class TopK(Architecture):
    name = "topk"
    uses_k = True
    at_most_k_active = True

    sparse_step = True

    def encode(self, cfg, params, buffers, x, k):
        return K.topk_mask(jax.nn.relu(K.pre_activation(params, x)), cfg.resolve_k(k))

    def sparse_encode(self, cfg, params, buffers, x, k, train):
        return S.topk_codes(params, x, cfg.resolve_k(k)), buffers


class MatryoshkaTopK(TopK):
    name = "matryoshka_topk"
    options = {
        "k_values": Option((), int_tuple_option(minimum=1), "the nested budgets of the loss"),
        "matryoshka_weights": Option((), float_tuple_option(), "one weight per k_values entry"),
    }

    @staticmethod
    def loss_k_values(cfg) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(k_values, weights); weights of mismatched length become all ones."""
        ks, ws = cfg.k_values, cfg.matryoshka_weights
        return ks, (ws if len(ws) == len(ks) else tuple(1.0 for _ in ks))

    def reconstruction_loss(self, cfg, params, buffers, x, k, train):
        """sum_j w_j MSE(recon at k_j, x) / sum_j w_j, with the code of the last k_j and aux 0;
        a plain TopK loss at ``k`` when no ``k_values`` are configured."""
        ks, ws = self.loss_k_values(cfg)
        if not ks:
            return super().reconstruction_loss(cfg, params, buffers, x, k, train)
        zero = jnp.zeros((), jnp.float32)
        total = zero
        out = None
        for kj, wj in zip(ks, ws):
            out = self.forward(cfg, params, buffers, x, kj, train)
            total = total + wj * K.mse(out.reconstruction, x)
        return LossTerms(total / sum(ws), out.code, zero, zero, out.mean_l0, out.buffers)

    def sparse_step_available(self, cfg, k):
        ks, _ = self.loss_k_values(cfg)
        return super().sparse_step_available(cfg, k) and all(kj < cfg.d_features for kj in ks)

    def sparse_work_fraction(self, cfg, k):
        ks, _ = self.loss_k_values(cfg)
        return max(max(ks) * len(ks), cfg.resolve_k(k)) / cfg.d_features if ks else super().sparse_work_fraction(cfg, k)

    def sparse_reconstruction_loss(self, cfg, params, buffers, x, k, train):
        """The weighted Matryoshka MSE from one TopK code at max(k_values): the code at each
        k_j is its prefix (values are descending, ties to the lower index, as ``top_k``)."""
        ks, ws = self.loss_k_values(cfg)
        if not ks:
            return super().sparse_reconstruction_loss(cfg, params, buffers, x, k, train)
        code = S.topk_codes(params, x, max(ks))
        errors = S.squared_errors(params["decoder"], code, x, ks)  # (L, B)
        total = jnp.sum(jnp.asarray(ws, jnp.float32) * jnp.sum(errors, axis=1)) / x.size
        last = S.SparseCode(code.values[:, : ks[-1]], code.indices[:, : ks[-1]])
        zero = jnp.zeros((), jnp.float32)
        l0 = jax.lax.stop_gradient(S.code_stats(last, cfg.d_features).l0)
        return SparseLossTerms(total / sum(ws), last, zero, zero, l0, buffers)


