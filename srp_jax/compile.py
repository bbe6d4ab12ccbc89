"""How srp-jax compiles: the one place that decides how functions are jitted.

Library kernels (encode, decompositions, evaluation passes) are wrapped with
:func:`compiled`: plain ``jax.jit`` with static configuration arguments, so their computation
follows the shardings of the arrays they are given (a Readout or Dictionary placed on a mesh
runs sharded). The train step is compiled with :func:`compile_step`: the state argument is
donated (updated in place on accelerators) and, when a mesh is in use, explicit input/output
shardings are set here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from .errors import ConfigError

#: ``training.step_strategy`` values: ``auto`` resolves per backend in :func:`resolve_step_strategy`
STEP_STRATEGIES = ("auto", "dense", "sparse")
#: backends whose ``auto`` step is the sparse one (measured: docs/performance.md)
SPARSE_STEP_BACKENDS = ("cpu",)
#: ``auto`` picks the sparse step when its gather / scatter work is at most this fraction of
#: the dense decode's (code width x loss levels / D; measured crossover on CPU about 1/6)
AUTO_SPARSE_MAX_FRACTION = 1 / 8


def compiled(
    fn: Callable | None = None,
    *,
    static_argnums: int | Sequence[int] | None = None,
    static_argnames: str | Sequence[str] | None = None,
):
    """``jax.jit`` for library kernels (decorator or call); configs and k are static
    (names and positions are inferred from each other, as ``jax.jit`` does)."""

    def wrap(f: Callable) -> Callable:
        return jax.jit(f, static_argnums=static_argnums, static_argnames=static_argnames)

    return wrap if fn is None else wrap(fn)


def compile_step(
    step: Callable, *, donate_state: bool = True, in_shardings: Any = None, out_shardings: Any = None
) -> Callable:
    """Compile ``step(state, batch) -> (state, metrics)``: the state (argument 0) is donated;
    ``in_shardings`` / ``out_shardings`` (pytrees of ``jax.sharding.Sharding`` matching
    ``(state, batch)`` / ``(state, metrics)``) pin the layout on a mesh."""
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate_state else ()}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(step, **kwargs)


def resolve_step_strategy(
    requested: str,
    *,
    sparse_supported: bool,
    sparse_fraction: float = 0.0,
    backend: str | None = None,
    sharded: bool = False,
    what: str = "",
) -> str:
    """The train step's strategy, ``"dense"`` or ``"sparse"``, decided here and nowhere else.

    ``requested`` is ``training.step_strategy``; ``sparse_supported`` whether the architecture
    (at this k) has the sparse step (the TopK family with k < D); ``sparse_fraction`` its
    gather / scatter work relative to the dense decode (code width x loss levels / D);
    ``backend`` defaults to ``jax.default_backend()``; ``sharded`` a step compiled for a device
    mesh (dense: its partition rules are written for the dense products). ``auto`` is sparse on
    the backends of :data:`SPARSE_STEP_BACKENDS` when ``sparse_fraction`` <=
    :data:`AUTO_SPARSE_MAX_FRACTION` (CPU: gathers and scatter-adds of the k active rows beat
    the dense (B x D) products once k is small against D) and dense elsewhere (GPU / TPU run
    the dense products near peak, and their scatter-adds are atomic, so not bitwise
    reproducible). An explicit ``sparse`` where it cannot run raises ConfigError naming ``what``.
    """
    if requested not in STEP_STRATEGIES:
        raise ConfigError(f"training.step_strategy must be one of {STEP_STRATEGIES}, got {requested!r}")
    if requested == "dense":
        return "dense"
    if requested == "sparse":
        if not sparse_supported:
            raise ConfigError(f"training.step_strategy 'sparse' is not available for {what or 'this factorizer'}; use dense or auto")
        if sharded:
            raise ConfigError("training.step_strategy 'sparse' is not available on a sharded mesh; use dense or auto")
        return "sparse"
    backend = jax.default_backend() if backend is None else backend
    cheap = sparse_fraction <= AUTO_SPARSE_MAX_FRACTION
    return "sparse" if sparse_supported and cheap and not sharded and backend in SPARSE_STEP_BACKENDS else "dense"


__all__ = ["compiled", "compile_step", "resolve_step_strategy", "STEP_STRATEGIES", "SPARSE_STEP_BACKENDS",
           "AUTO_SPARSE_MAX_FRACTION"]
