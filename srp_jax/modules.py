"""Thin ``flax.linen`` wrappers over the pure kernels of :mod:`srp_jax.factorizers`.

For users who prefer the module style of the PyTorch reference (``TopKSAE(d_model,
d_features, k)``, ``model.encode(x, k)``). The modules own no maths: every call builds the
parameter/buffer pytrees and hands them to ``factorizers.encode`` / ``forward`` /
``reconstruction_loss``, so a module and the pure functions can never disagree.

Variables produced by ``init`` have exactly the pure layout::

    {"params":  {"encoder": {"kernel": (d, D), "bias": (D,)}, "decoder": (D, d), ...extras},
     "buffers": {}  |  batch_topk / jumprelu buffers}

so a loaded :class:`~srp_jax.dictionary.Dictionary` applies directly:
``module.apply({"params": d.params, "buffers": d.buffers}, x)`` (see
:func:`module_from_dictionary` / :func:`bind_dictionary`).

Constructor arguments follow the reference's positional order per class (``TopKSAE(d_model,
d_features, k, encoder_init_scale)``, ``JumpReLUSAE(d_model, d_features, encoder_init_scale,
log_threshold_init, bandwidth)``, ...); ``architecture`` is an extra keyword, so the
Matryoshka variant is ``TopKSAE(..., architecture="matryoshka_topk")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import factorizers as F
from .config import FactorizerConfig
from .errors import ConfigError

# --------------------------------------------------------------------------------------------
# Initialisers (the reference's distributions)


def _decoder_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """N(0, d^-1/2) then unit-norm rows: shape (D, d)."""
    return F.normalize_rows(jax.random.normal(key, shape, dtype) * shape[1] ** -0.5)


class _Encoder(nn.Module):
    """Holds ``encoder.kernel`` (d, D) ~ N(0, scale) and ``encoder.bias`` (D,) = 0.

    Only a parameter container: the matmul itself lives in ``factorizers.pre_activation``.
    """

    d_model: int
    d_features: int
    init_scale: float

    def setup(self) -> None:
        self.kernel = self.param("kernel", nn.initializers.normal(stddev=self.init_scale), (self.d_model, self.d_features))
        self.bias = self.param("bias", nn.initializers.zeros_init(), (self.d_features,))


# --------------------------------------------------------------------------------------------
# Modules


class SAEBase(nn.Module):
    """Common base: the encoder/decoder parameters and the calls into the pure kernels.

    Subclasses declare their hyperparameters as fields (reference order) and an
    ``architecture`` field; ``factorizer_config`` turns them into a :class:`FactorizerConfig`.
    """

    d_model: int
    d_features: int

    # -- hyperparameters -> config
    _ALLOWED: ClassVar[tuple[str, ...]] = ()

    def _config_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError("SAEBase is abstract; use TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE or L1ReLUSAE")

    @property
    def factorizer_config(self) -> FactorizerConfig:
        """The :class:`FactorizerConfig` equivalent to this module's attributes."""
        arch = getattr(self, "architecture", "base")
        if arch not in self._ALLOWED:
            raise ConfigError(
                f"{type(self).__name__} cannot have architecture {arch!r} (allowed: {', '.join(self._ALLOWED) or 'none'})"
            )
        return FactorizerConfig(architecture=arch, d_features=self.d_features, **self._config_kwargs())

    # -- variables
    def setup(self) -> None:
        cfg = self.factorizer_config
        self.encoder = _Encoder(self.d_model, self.d_features, cfg.encoder_init_scale)
        self.decoder = self.param("decoder", _decoder_init, (self.d_features, self.d_model))
        self._extra = {
            name: self.param(name, nn.initializers.constant(init(cfg)), (self.d_features,))
            for name, init in cfg.arch.extra_params.items()
        }
        fresh = F.init_buffers(cfg)
        self._buffers = {name: self.variable("buffers", name, lambda v=value: v) for name, value in fresh.items()}

    def _params(self) -> F.Params:
        params: F.Params = {
            "encoder": {"kernel": self.encoder.kernel, "bias": self.encoder.bias},
            "decoder": self.decoder,
        }
        params.update(self._extra)
        return params

    def _buffer_values(self) -> F.Buffers:
        return {name: var.value for name, var in self._buffers.items()}

    def _store_buffers(self, new: F.Buffers) -> None:
        """Write updated buffers back when the collection is mutable (never during init)."""
        if self.is_initializing() or not self.is_mutable_collection("buffers"):
            return
        for name, var in self._buffers.items():
            var.value = new[name]

    def _check_ready(self) -> None:
        if not self.is_initializing():
            F.check_ready(self.factorizer_config, self._buffer_values())

    # -- reference API
    def __call__(self, x: jax.Array, k: int | None = None, train: bool = False) -> F.FactorizerOutput:
        """``forward``: x (B, d) -> FactorizerOutput. ``train=True`` updates the "buffers"
        collection when it is mutable (``apply(..., mutable=["buffers"])``)."""
        cfg = self.factorizer_config
        if not train:
            self._check_ready()
        out = F.forward(cfg, self._params(), self._buffer_values(), x, k, train=train)
        if train:
            self._store_buffers(out.buffers)
        return out

    def encode(self, x: jax.Array, k: int | None = None) -> jax.Array:
        """Eval-mode code (B, D); side-effect free (BatchTopK uses its learned threshold)."""
        self._check_ready()
        return F.encode(self.factorizer_config, self._params(), self._buffer_values(), x, k)

    def decode(self, code: jax.Array) -> jax.Array:
        """code (B, D) @ decoder -> (B, d)."""
        return F.decode(self._params(), code)

    def reconstruction_loss(self, x: jax.Array, k: int | None = None, train: bool = True) -> F.LossTerms:
        """The reference ``reconstruction_loss`` (matryoshka multi-k when configured)."""
        out = F.reconstruction_loss(self.factorizer_config, self._params(), self._buffer_values(), x, k, train=train)
        if train:
            self._store_buffers(out.buffers)
        return out


class TopKSAE(SAEBase):
    """Per-row TopK (``topk``; ``architecture="matryoshka_topk"`` for the multi-k loss)."""

    k: int = 32
    encoder_init_scale: float = 0.02
    architecture: str = "topk"
    k_values: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()

    _ALLOWED = ("topk", "matryoshka_topk")

    def _config_kwargs(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "encoder_init_scale": self.encoder_init_scale,
            "k_values": tuple(self.k_values),
            "matryoshka_weights": tuple(self.matryoshka_weights),
        }


class BatchTopKSAE(SAEBase):
    """BatchTopK: top B*k over the batch in training, a learned threshold in eval."""

    k: int = 32
    encoder_init_scale: float = 0.02
    threshold_momentum: float = 0.995
    architecture: str = "batch_topk"

    _ALLOWED = ("batch_topk",)

    def _config_kwargs(self) -> dict[str, Any]:
        return {"k": self.k, "encoder_init_scale": self.encoder_init_scale, "threshold_momentum": self.threshold_momentum}


class JumpReLUSAE(SAEBase):
    """JumpReLU: per-feature threshold exp(log_threshold), rectangle-STE L0 (``k`` = D)."""

    encoder_init_scale: float = 0.02
    log_threshold_init: float = -6.0
    bandwidth: float = 0.5
    architecture: str = "jumprelu"

    _ALLOWED = ("jumprelu",)

    @property
    def k(self) -> int:
        return int(self.d_features)

    def _config_kwargs(self) -> dict[str, Any]:
        return {
            "encoder_init_scale": self.encoder_init_scale,
            "log_threshold_init": self.log_threshold_init,
            "bandwidth": self.bandwidth,
        }



class GatedSAE(SAEBase):
    """Gated (weight-tied): hard gate 1[xW + gate_bias > 0], magnitude ReLU(e^r xW + b)."""

    encoder_init_scale: float = 0.02
    architecture: str = "gated"

    _ALLOWED = ("gated",)

    @property
    def k(self) -> int:
        return int(self.d_features)

    def _config_kwargs(self) -> dict[str, Any]:
        return {"encoder_init_scale": self.encoder_init_scale}



class L1ReLUSAE(SAEBase):
    """Plain ReLU code with a decoder-norm-weighted L1 aux loss (``k`` = D)."""

    encoder_init_scale: float = 0.02
    architecture: str = "l1_relu"

    _ALLOWED = ("l1_relu",)

    @property
    def k(self) -> int:
        return int(self.d_features)

    def _config_kwargs(self) -> dict[str, Any]:
        return {"encoder_init_scale": self.encoder_init_scale}


class Factorizer(SAEBase):
    """The generic shell for any registered architecture: ``Factorizer(d_model, d_features,
    config)`` (``config`` a :class:`FactorizerConfig`; its ``d_features`` must match)."""

    config: Any = None

    @property
    def k(self) -> int:
        return self.factorizer_config.native_k

    @property
    def architecture(self) -> str:
        return self.factorizer_config.architecture

    @property
    def factorizer_config(self) -> FactorizerConfig:
        cfg = self.config
        if not isinstance(cfg, FactorizerConfig):
            raise ConfigError(f"Factorizer needs config=FactorizerConfig(...), got {type(cfg).__name__}")
        if cfg.d_features != self.d_features:
            raise ConfigError(f"Factorizer: d_features {self.d_features} disagrees with config.d_features {cfg.d_features}")
        return cfg


# The reference's class per built-in architecture (their constructors are the reference's);
# any other registered architecture gets the generic Factorizer.
MODULE_CLASSES: dict[str, type[SAEBase]] = {
    "topk": TopKSAE,
    "matryoshka_topk": TopKSAE,
    "batch_topk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "l1_relu": L1ReLUSAE,
}


# --------------------------------------------------------------------------------------------
# Building


def module_from_config(cfg: FactorizerConfig, d_model: int) -> SAEBase:
    """The module equivalent of a :class:`FactorizerConfig`: the reference class of a built-in
    architecture (its fields read from the config), else the generic :class:`Factorizer`."""
    cls = MODULE_CLASSES.get(cfg.architecture)
    if cls is None:
        return Factorizer(int(d_model), cfg.d_features, cfg)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in ("d_model", "d_features", "parent", "name") or not field.init:
            continue
        kwargs[field.name] = cfg.native_k if field.name == "k" else getattr(cfg, field.name)
    return cls(int(d_model), cfg.d_features, **kwargs)


def build_factorizer(config: Mapping[str, Any] | FactorizerConfig, d_model: int, *, strict: bool = True) -> SAEBase:
    """The reference ``build_factorizer(config, d_model)``.

    ``config`` is a run configuration holding a ``factorizer`` block (missing -> all defaults,
    as in the reference) or a :class:`FactorizerConfig`. ``strict`` rejects unknown keys in
    the block (pass False for blocks read from foreign checkpoints).
    """
    if isinstance(config, FactorizerConfig):
        cfg = config
    elif isinstance(config, Mapping):
        block = config.get("factorizer") or {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"factorizer block must be a mapping, got {type(block).__name__}")
        cfg = FactorizerConfig.from_dict(block, strict=strict)
    else:
        raise ConfigError(f"build_factorizer: config must be a dict or FactorizerConfig, got {type(config).__name__}")
    if isinstance(d_model, bool) or int(d_model) < 1:
        raise ConfigError(f"build_factorizer: d_model must be a positive integer, got {d_model!r}")
    return module_from_config(cfg, int(d_model))


def dictionary_variables(dictionary) -> dict[str, Any]:
    """``{"params": ..., "buffers": ...}`` of a :class:`~srp_jax.dictionary.Dictionary`."""
    return {"params": dictionary.params, "buffers": dictionary.buffers}


def module_from_dictionary(dictionary) -> SAEBase:
    """The (unbound) module matching a loaded Dictionary; apply it with
    ``module.apply(dictionary_variables(dictionary), x)``."""
    return module_from_config(dictionary.config, dictionary.d_model)


def bind_dictionary(dictionary, *, mutable: bool | list[str] = False) -> SAEBase:
    """A bound module over a Dictionary's variables (``bound.encode(x)``, ``bound(x)``).

    With ``mutable=["buffers"]`` training-mode calls update the bound buffers; read them back
    with ``bound.variables["buffers"]``.
    """
    module = module_from_dictionary(dictionary)
    return module.bind(dictionary_variables(dictionary), mutable=mutable)


__all__ = [
    "SAEBase",
    "TopKSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "GatedSAE",
    "L1ReLUSAE",
    "MODULE_CLASSES",
    "build_factorizer",
    "module_from_config",
    "module_from_dictionary",
    "dictionary_variables",
    "bind_dictionary",
]
