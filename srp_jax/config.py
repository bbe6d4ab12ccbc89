"""Configuration blocks with the reference's keys and defaults.

``FactorizerConfig`` and ``EvaluationConfig`` mirror the ``factorizer:`` and ``evaluation:``
blocks of the reference YAML / checkpoints. They are frozen (hashable) so they can be static
arguments of jitted functions. The full run configuration (``run``, ``data``, ``training``,
``artifacts``, ``mesh``, ...) builds on these further down in this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

ARCHITECTURES = ("topk", "matryoshka_topk", "batch_topk", "jumprelu", "gated", "l1_relu")
TOPK_FAMILY = ("topk", "matryoshka_topk")
K_ARCHITECTURES = ("topk", "matryoshka_topk", "batch_topk")  # those for which k means something
DEFAULT_K = 32


def _as_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    out = int(as_float)
    if minimum is not None and out < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {out}")
    return out


def _as_float(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return out


def _unknown_keys(block: str, given: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(given) - known)
    if extra:
        raise ConfigError(
            f"unknown key(s) in {block}: {', '.join(extra)} (known: {', '.join(sorted(known))})"
        )


@dataclasses.dataclass(frozen=True)
class FactorizerConfig:
    """The ``factorizer:`` block. Defaults are the reference's ``build_factorizer`` defaults.

    ``k`` is the trained TopK budget; for ``jumprelu``, ``gated`` and ``l1_relu`` it is unused
    and the dictionary's ``native_k`` is ``d_features`` (the reference's ``model.k``).
    """

    architecture: str = "topk"
    d_features: int = 1024
    k: int | None = None  # None = not given: the TopK family then trains with 32
    encoder_init_scale: float = 0.02
    k_values: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    threshold_momentum: float = 0.995
    log_threshold_init: float = -6.0
    bandwidth: float = 0.5

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown factorizer architecture {self.architecture!r} "
                f"(expected one of: {', '.join(ARCHITECTURES)})"
            )
        object.__setattr__(self, "d_features", _as_int("factorizer.d_features", self.d_features, minimum=1))
        object.__setattr__(self, "k", _as_int("factorizer.k", self.k, minimum=0, allow_none=True))
        object.__setattr__(
            self, "encoder_init_scale", _as_float("factorizer.encoder_init_scale", self.encoder_init_scale)
        )
        object.__setattr__(
            self,
            "k_values",
            tuple(_as_int("factorizer.k_values[]", v, minimum=1) for v in (self.k_values or ())),
        )
        object.__setattr__(
            self,
            "matryoshka_weights",
            tuple(_as_float("factorizer.matryoshka_weights[]", v) for v in (self.matryoshka_weights or ())),
        )
        m = _as_float("factorizer.threshold_momentum", self.threshold_momentum)
        if not 0.0 <= m <= 1.0:
            raise ConfigError(f"factorizer.threshold_momentum must be in [0, 1], got {m}")
        object.__setattr__(self, "threshold_momentum", m)
        object.__setattr__(
            self, "log_threshold_init", _as_float("factorizer.log_threshold_init", self.log_threshold_init)
        )
        bw = _as_float("factorizer.bandwidth", self.bandwidth)
        if bw <= 0:
            raise ConfigError(f"factorizer.bandwidth must be > 0, got {bw}")
        object.__setattr__(self, "bandwidth", bw)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, *, strict: bool = True) -> FactorizerConfig:
        """Build from a reference ``factorizer`` block.

        ``strict`` rejects unknown keys (YAML configs); checkpoint loading passes
        ``strict=False`` because published checkpoints may carry keys we do not use.
        """
        block = dict(block or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if strict:
            _unknown_keys("factorizer", block, known)
        kwargs = {key: block[key] for key in known if key in block and block[key] is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A reference-style ``factorizer`` block (plain Python values, JSON/YAML-safe)."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_features": self.d_features,
            "encoder_init_scale": self.encoder_init_scale,
        }
        if self.k is not None:
            out["k"] = self.k
        if self.architecture == "matryoshka_topk" or self.k_values:
            out["k_values"] = list(self.k_values)
            out["matryoshka_weights"] = list(self.matryoshka_weights)
        if self.architecture == "batch_topk":
            out["threshold_momentum"] = self.threshold_momentum
        if self.architecture == "jumprelu":
            out["log_threshold_init"] = self.log_threshold_init
            out["bandwidth"] = self.bandwidth
        return out

    @property
    def native_k(self) -> int:
        """The reference's ``model.k``: the trained k for the TopK family, else ``d_features``."""
        if self.architecture in K_ARCHITECTURES:
            return DEFAULT_K if self.k is None else self.k
        return self.d_features

    def resolve_k(self, k: int | None = None) -> int:
        """``k or native_k`` (0 and None both fall back, as in the reference)."""
        if k is None or (not isinstance(k, bool) and k == 0):
            return self.native_k
        return _as_int("k", k, minimum=1)

    def loss_k_values(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Matryoshka (k_values, weights); weights of mismatched length become all ones."""
        ks = self.k_values
        ws = self.matryoshka_weights
        if len(ws) != len(ks):
            ws = tuple(1.0 for _ in ks)
        return ks, ws


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The ``evaluation:`` block: audit k and the eval-set sizes (reference defaults)."""

    k: int | None = None
    max_eval_rows: int | None = None
    max_eval_hidden: int | None = None
    contribution_top_k: int = 8
    topk_overlap: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _as_int("evaluation.k", self.k, minimum=0, allow_none=True))
        object.__setattr__(
            self, "max_eval_rows", _as_int("evaluation.max_eval_rows", self.max_eval_rows, minimum=0, allow_none=True)
        )
        object.__setattr__(
            self,
            "max_eval_hidden",
            _as_int("evaluation.max_eval_hidden", self.max_eval_hidden, minimum=0, allow_none=True),
        )
        object.__setattr__(
            self, "contribution_top_k", _as_int("evaluation.contribution_top_k", self.contribution_top_k, minimum=1)
        )
        object.__setattr__(self, "topk_overlap", _as_int("evaluation.topk_overlap", self.topk_overlap, minimum=1))

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, *, strict: bool = True) -> EvaluationConfig:
        block = dict(block or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if strict:
            _unknown_keys("evaluation", block, known)
        kwargs = {key: block[key] for key in known if key in block and block[key] is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_eval_k(evaluation: EvaluationConfig | Mapping[str, Any] | None, factorizer: FactorizerConfig) -> int:
    """The audit k: ``evaluation.k or factorizer.k or native k`` (an ``or`` chain, as the reference)."""
    if isinstance(evaluation, Mapping):
        ek = evaluation.get("k")
    else:
        ek = evaluation.k if evaluation is not None else None
    if ek:
        return int(ek)
    if factorizer.k:
        return int(factorizer.k)
    return factorizer.native_k
