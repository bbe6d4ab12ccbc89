"""The architecture-generic pure functions: look the architecture up, call its method.

``cfg`` is a :class:`~srp_jax.config.FactorizerConfig` (static, hashable); arrays come after,
so each function jits with ``cfg`` (and ``k``) static. ``encode``/``decode`` are the single
shared kernels: training, evaluation, decomposition and conversion all go through them.
The semantics are the PyTorch reference's exactly: ReLU before top-k, zeros outside it,
``k`` = 0/None fall back to the trained k, ``k >= D`` returns the dense ReLU, strict ``>``
comparisons everywhere.
"""

from __future__ import annotations

from typing import Any

import jax

from ..compile import compiled
from .base import FactorizerOutput, LossTerms, SparseLossTerms
from .sparse import SparseCode
from .kernels import Buffers, Params, decode
from .registry import get_architecture


def architecture_of(cfg: Any):
    """The registered :class:`~srp_jax.factorizers.base.Architecture` of a config."""
    return get_architecture(cfg.architecture)


def init_factorizer(key: jax.Array, cfg: Any, d_model: int) -> tuple[Params, Buffers]:
    """Fresh (params, buffers) with the reference's distributions (see each architecture)."""
    return architecture_of(cfg).init(key, cfg, int(d_model))


def init_buffers(cfg: Any) -> Buffers:
    """Fresh buffers (an unset BatchTopK threshold, a JumpReLU RMS EMA at 1.0, or {})."""
    return architecture_of(cfg).init_buffers(cfg)


def encode(cfg: Any, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None) -> jax.Array:
    """Eval-mode code (B, D) of normalized rows x (B, d). Pure: buffers are only read.

    batch_topk uses its learned threshold (callers holding concrete buffers check
    ``check_ready`` first); jumprelu, gated and l1_relu ignore ``k``.
    """
    return architecture_of(cfg).encode(cfg, params, buffers, x, k)


def forward(
    cfg: Any, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None, *, train: bool = False
) -> FactorizerOutput:
    """Encode, decode and the architecture's auxiliary terms (the reference ``forward``).

    ``train=True`` is the reference's training mode: batch_topk selects the top B*k entries of
    the whole batch and updates its threshold EMA; jumprelu updates its RMS EMA (first, then
    uses it as the STE bandwidth scale). Every other architecture is the same in both modes.
    """
    return architecture_of(cfg).forward(cfg, params, buffers, x, k, train)


def reconstruction_loss(
    cfg: Any, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None, *, train: bool = True
) -> LossTerms:
    """The reference ``reconstruction_loss``: MSE of one forward at ``k`` (matryoshka: the
    weighted mean over its ``k_values``; gated adds ``aux_recon_mse``)."""
    return architecture_of(cfg).reconstruction_loss(cfg, params, buffers, x, k, train)


def sparse_step_available(cfg: Any, k: int | None = None) -> bool:
    """Whether the sparse train step applies to ``cfg`` at ``k`` (the TopK family with k < D)."""
    return architecture_of(cfg).sparse_step_available(cfg, k)


def sparse_work_fraction(cfg: Any, k: int | None = None) -> float:
    """The sparse step's gather / scatter work relative to the dense decode (see
    :func:`srp_jax.compile.resolve_step_strategy`)."""
    return architecture_of(cfg).sparse_work_fraction(cfg, k)


def sparse_code_available(cfg: Any, k: int | None = None) -> bool:
    """Whether :func:`sparse_code` gives ``encode``'s code exactly (the TopK family, k < D)."""
    return architecture_of(cfg).sparse_code_available(cfg, k)


def sparse_code(cfg: Any, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None) -> SparseCode:
    """The eval-mode code of rows x (B, d) as (values, indices) (B, k), values descending:
    ``encode`` without the dense (B, D) code (see :func:`sparse_code_available`)."""
    return architecture_of(cfg).sparse_code(cfg, params, buffers, x, k)


def sparse_encode(
    cfg: Any, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None, *, train: bool = True
) -> tuple[SparseCode, Buffers]:
    """The code of :func:`forward` as (values, indices) (B, k) with sparse gradients, and the
    buffers after the call (architectures with ``sparse_step`` only)."""
    return architecture_of(cfg).sparse_encode(cfg, params, buffers, x, k, train)


def sparse_reconstruction_loss(
    cfg: Any, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None, *, train: bool = True
) -> SparseLossTerms:
    """:func:`reconstruction_loss` through the sparse kernels (equal up to summation order)."""
    return architecture_of(cfg).sparse_reconstruction_loss(cfg, params, buffers, x, k, train)


def check_ready(cfg: Any, buffers: Buffers) -> None:
    """Raise if an eval-mode encode would use state that was never learned (BatchTopK's
    threshold before any training batch). No-op under tracing."""
    architecture_of(cfg).check_ready(cfg, buffers)


# Jitted conveniences: cfg and k are static (hashable), arrays are traced.
encode_jit = compiled(encode, static_argnums=(0, 4))
forward_jit = compiled(forward, static_argnums=(0, 4), static_argnames=("train",))
decode_jit = compiled(decode)

__all__ = [
    "architecture_of",
    "init_factorizer",
    "init_buffers",
    "encode",
    "forward",
    "reconstruction_loss",
    "sparse_step_available",
    "sparse_work_fraction",
    "sparse_code_available",
    "sparse_code",
    "sparse_encode",
    "sparse_reconstruction_loss",
    "check_ready",
    "encode_jit",
    "forward_jit",
    "decode_jit",
]
