"""What an architecture is: the :class:`Architecture` interface every factorizer implements.

An architecture owns, in one module: its parameters and buffers (names, shapes, initial
values), the eval-mode ``encode``, the training ``forward`` (with its auxiliary terms and
buffer updates), its reconstruction loss, its contribution to the training loss (sparsity
coefficients, L0-controller coupling), its own ``factorizer:`` config keys and its native k.
The PyTorch state-dict keys follow from the declared parameters and buffers
(:mod:`srp_jax.factorizers.state_dict`).

The methods take the :class:`~srp_jax.config.FactorizerConfig` (static, hashable) first and
arrays after, so every method jits with the config as a static argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from .._validate import as_float, as_int, as_list
from ..errors import ConfigError
from . import kernels as K
from . import sparse as S
from .kernels import Buffers, Params

if TYPE_CHECKING:  # pragma: no cover
    from ..config import FactorizerConfig, TrainingConfig

DEFAULT_K = 32  # the reference's k when a TopK-family config gives none


class FactorizerOutput(NamedTuple):
    """What ``forward`` returns (the reference's ``FactorizerBatch`` plus updated buffers).

    reconstruction (B, d); code (B, D) post-sparsity; aux_loss scalar; aux_recon (B, d) for
    gated else None; mean_l0 scalar (the reference's ``info['mean_l0_train']``); buffers the
    buffer pytree after this call (changed only in training mode for batch_topk / jumprelu).
    """

    reconstruction: jax.Array
    code: jax.Array
    aux_loss: jax.Array
    aux_recon: jax.Array | None
    mean_l0: jax.Array
    buffers: Buffers


class LossTerms(NamedTuple):
    """``reconstruction_loss`` result: rec (scalar MSE), code (B, D), aux (scalar),
    aux_recon_mse (scalar; gated only, else 0), mean_l0 (scalar), buffers (updated)."""

    rec: jax.Array
    code: jax.Array
    aux: jax.Array
    aux_recon_mse: jax.Array
    mean_l0: jax.Array
    buffers: Buffers


class SparseLossTerms(NamedTuple):
    """``sparse_reconstruction_loss`` result: like :class:`LossTerms` with the code as a
    :class:`~srp_jax.factorizers.sparse.SparseCode` (``code.values`` / ``code.indices`` (B, k))."""

    rec: jax.Array
    code: S.SparseCode
    aux: jax.Array
    aux_recon_mse: jax.Array
    mean_l0: jax.Array
    buffers: Buffers


@dataclasses.dataclass(frozen=True)
class Option:
    """One architecture-specific ``factorizer:`` key: its default and a coercion
    ``coerce(qualified_name, value) -> value`` that raises ConfigError on bad input.
    Values must be hashable (tuples, not lists): configs are static jit arguments."""

    default: Any
    coerce: Callable[[str, Any], Any]
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class BufferSpec:
    """A scalar buffer: dtype (``"float32"`` or ``"int32"``; int buffers are flags written as
    int64 in ``.pt`` files) and its fresh value."""

    dtype: str
    initial: float | int


class Architecture:
    """Base class of the factorizer architectures (one subclass per module, one instance in
    the registry). Subclasses set the class attributes and implement ``encode``; the
    defaults cover a stateless architecture whose training forward is its eval encode.
    """

    #: the ``factorizer.architecture`` name
    name: ClassVar[str] = ""
    #: ``k`` is the trained sparsity budget (native k = k or 32); otherwise native k = D
    uses_k: ClassVar[bool] = False
    #: a code never has more than k nonzeros per row (sparse decompositions of width k are exact)
    at_most_k_active: ClassVar[bool] = False
    #: the training-mode code differs from the eval-mode code (batch-wide selection): a
    #: Dictionary in training mode encodes through ``forward(train=True)`` and keeps the
    #: buffers it updates; decompositions refuse a dictionary in training mode
    encode_depends_on_mode: ClassVar[bool] = False
    #: architecture-specific ``factorizer:`` keys
    options: ClassVar[Mapping[str, Option]] = {}
    #: extra (D,) float32 parameters beside encoder/decoder, each filled with a constant
    #: ``init(cfg)`` (declared order = the torch state-dict order)
    extra_params: ClassVar[Mapping[str, Callable[[Any], float]]] = {}
    #: scalar buffers (declared order = the torch state-dict order)
    buffers: ClassVar[Mapping[str, BufferSpec]] = {}
    #: decoder rows are renormalised to unit norm after every optimiser step
    renormalize_decoder: ClassVar[bool] = True
    #: ``training.l0_controller`` drives this architecture's sparsity coefficient
    l0_controller: ClassVar[bool] = False
    #: the controller's default upper clamp (``l0_controller.coeff_max`` None)
    controller_coeff_max: ClassVar[float] = 0.05
    #: implements ``sparse_encode`` (a training code with a fixed number of entries per row),
    #: so the sparse train step applies (see ``sparse_step_available``)
    sparse_step: ClassVar[bool] = False

    # ---- parameters and buffers
    def init(self, key: jax.Array, cfg: FactorizerConfig, d_model: int) -> tuple[Params, Buffers]:
        """Fresh (params, buffers) with the reference's distributions."""
        params = K.init_encoder_decoder(key, cfg.d_features, d_model, cfg.encoder_init_scale)
        for name, init in self.extra_params.items():
            params[name] = jnp.full((cfg.d_features,), init(cfg), jnp.float32)
        return params, self.init_buffers(cfg)

    def init_buffers(self, cfg: FactorizerConfig) -> Buffers:
        return {name: jnp.asarray(spec.initial, spec.dtype) for name, spec in self.buffers.items()}

    # ---- maths
    def encode(self, cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None) -> jax.Array:
        """Eval-mode code (B, D) of normalized rows x (B, d). Pure: buffers are only read."""
        raise NotImplementedError(f"{type(self).__name__}.encode")

    def aux_loss(self, cfg: FactorizerConfig, params: Params, code: jax.Array) -> jax.Array:
        """The architecture's sparsity term of a stateless forward (default 0)."""
        return jnp.zeros((), jnp.float32)

    def forward(
        self, cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None, train: bool
    ) -> FactorizerOutput:
        """Encode, decode and the auxiliary terms. Default: the eval encode in both modes."""
        code = self.encode(cfg, params, buffers, x, k)
        aux = self.aux_loss(cfg, params, code)
        return FactorizerOutput(
            K.decode(params, code), code, aux, None, jax.lax.stop_gradient(K.active_count(code)), buffers
        )

    def reconstruction_loss(
        self, cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None, train: bool
    ) -> LossTerms:
        """MSE of one forward at ``k`` (plus MSE of ``aux_recon`` when the forward has one)."""
        out = self.forward(cfg, params, buffers, x, k, train)
        aux_mse = K.mse(out.aux_recon, x) if out.aux_recon is not None else jnp.zeros((), jnp.float32)
        return LossTerms(K.mse(out.reconstruction, x), out.code, out.aux_loss, aux_mse, out.mean_l0, out.buffers)

    def sparsity_penalty(
        self, training: TrainingConfig, terms: LossTerms, controller_coeff: jax.Array | None
    ) -> jax.Array | None:
        """What this architecture adds to the training loss beside the reconstruction MSE
        (None: nothing, e.g. TopK whose sparsity is structural).

        ``controller_coeff`` is the L0 controller's coefficient when the controller drives
        this architecture (``l0_controller`` and ``training.l0_controller.enabled``), else None.
        """
        return None

    def check_ready(self, cfg: FactorizerConfig, buffers: Buffers) -> None:
        """Raise if eval-mode encoding with these (concrete) buffers would be meaningless."""

    # ---- the sparse train step (architectures with ``sparse_step``)
    def sparse_step_available(self, cfg: FactorizerConfig, k: int | None) -> bool:
        """Whether the sparse step computes this architecture's loss at ``k`` (default:
        ``sparse_step`` and a budget of 1 <= k < D, where the code is really sparse)."""
        return self.sparse_step and 1 <= cfg.resolve_k(k) < cfg.d_features

    def sparse_work_fraction(self, cfg: FactorizerConfig, k: int | None) -> float:
        """The sparse step's gather / scatter work relative to the dense decode's: the code
        width times the number of reconstructions the loss takes, over D (default k / D)."""
        return cfg.resolve_k(k) / cfg.d_features

    def sparse_code_available(self, cfg: FactorizerConfig, k: int | None) -> bool:
        """Whether :meth:`sparse_code` gives the eval-mode code exactly (at most k active per
        row, 1 <= k < D)."""
        return self.at_most_k_active and self.sparse_step and 1 <= cfg.resolve_k(k) < cfg.d_features

    def sparse_code(
        self, cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None
    ) -> S.SparseCode:
        """The eval-mode code of ``encode`` as (values, indices) (B, k) (the fast encode of
        decompositions, code tables and full-vocabulary reconstruction). Default: the
        training-mode sparse code, for architectures whose code does not depend on the mode."""
        return self.sparse_encode(cfg, params, buffers, x, k, False)[0]

    def sparse_encode(
        self, cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None, train: bool
    ) -> tuple[S.SparseCode, Buffers]:
        """The code of ``forward`` as a :class:`~srp_jax.factorizers.sparse.SparseCode` (same
        values, differentiable with sparse gradients), and the buffers after the call."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse step")

    def sparse_reconstruction_loss(
        self, cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None, train: bool
    ) -> SparseLossTerms:
        """``reconstruction_loss`` through the sparse kernels (equal up to summation order)."""
        code, buffers = self.sparse_encode(cfg, params, buffers, x, k, train)
        kk = code.values.shape[1]
        rec = jnp.sum(S.squared_errors(params["decoder"], code, x, (kk,))) / x.size
        zero = jnp.zeros((), jnp.float32)
        l0 = jax.lax.stop_gradient(S.code_stats(code, cfg.d_features).l0)
        return SparseLossTerms(rec, code, zero, zero, l0, buffers)

    # ---- config
    def option_values(self, cfg: FactorizerConfig) -> dict[str, Any]:
        """This architecture's keys of a reference-style ``factorizer`` block (JSON-safe)."""
        out = {}
        for name in self.options:
            value = getattr(cfg, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def __repr__(self) -> str:
        return f"<architecture {self.name!r} ({type(self).__module__}.{type(self).__qualname__})>"


# ---- coercions for Option (thin wrappers over srp_jax._validate, returning hashable values)


def float_option(minimum: float | None = None, maximum: float | None = None, *, exclusive_minimum: bool = False):
    def coerce(name: str, value: Any) -> float:
        out = as_float(name, value)
        if minimum is not None and (out <= minimum if exclusive_minimum else out < minimum):
            raise ConfigError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {out}")
        if maximum is not None and out > maximum:
            raise ConfigError(f"{name} must be <= {maximum}, got {out}")
        return out

    return coerce


def int_tuple_option(minimum: int | None = None):
    def coerce(name: str, value: Any) -> tuple[int, ...]:
        return tuple(as_int(f"{name}[]", v, minimum=minimum) for v in as_list(name, value))

    return coerce


def float_tuple_option():
    def coerce(name: str, value: Any) -> tuple[float, ...]:
        return tuple(as_float(f"{name}[]", v) for v in as_list(name, value))

    return coerce


__all__ = [
    "DEFAULT_K",
    "FactorizerOutput",
    "LossTerms",
    "SparseLossTerms",
    "Option",
    "BufferSpec",
    "Architecture",
    "float_option",
    "int_tuple_option",
    "float_tuple_option",
]

FactorizerBatch = FactorizerOutput  # the reference's name for a forward's result
__all__.append("FactorizerBatch")
