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


def enable_persistent_cache(directory: Any) -> bool:
    """Keep compiled kernels on disk between processes (JAX's persistent compilation cache),
    so a short command (``srp-jax explain``) does not recompile the same kernels every run.

    ``directory``: the CLI passes ``<srp-jax cache>/jax-compilation``. Off when the
    environment sets ``SRP_JAX_COMPILATION_CACHE=0`` or JAX already has a cache directory.
    Returns whether this call turned it on.
    """
    import os

    if os.environ.get("SRP_JAX_COMPILATION_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return False
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return True


__all__ = ["compiled", "compile_step", "enable_persistent_cache"]
