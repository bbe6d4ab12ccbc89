"""How srp-jax compiles: the one place that decides how functions are jitted.

Library kernels (encode, decompositions, evaluation passes) are wrapped with
:func:`compiled`: plain ``jax.jit`` with static configuration arguments, so their computation
follows the shardings of the arrays they are given (a Readout or Dictionary placed on a mesh
runs sharded). The train step is compiled with :func:`compile_step`: the state argument is
donated (updated in place on accelerators) and, when a mesh is in use, explicit input/output
shardings are set here and nowhere else.

The device mesh has two named axes, :data:`DATA` (the batch / vocabulary rows) and
:data:`MODEL` (the latent axis D). Kernels that must know the mesh (the latent-sharded top-k)
read the *ambient* mesh (:func:`mesh_axis_size`, from ``jax.set_mesh``): a function compiled
here with ``mesh=`` runs and traces inside that context, and the abstract mesh is part of
jit's cache key, so one jitted kernel compiles once per mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax

from .errors import ConfigError

DATA = "data"  # the batch axis (training rows, evaluated vocabulary rows)
MODEL = "model"  # the latent axis D (encoder columns, decoder rows)
MESH_AXES = (DATA, MODEL)


def mesh_axis_size(name: str) -> int:
    """Size of axis ``name`` of the ambient mesh (``jax.set_mesh``); 1 without a mesh or axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 1
    return int(mesh.shape[name])


def spread_rows(x: jax.Array) -> jax.Array:
    """Hint that ``x``'s leading axis is split over every device of the ambient mesh (when it
    divides evenly): lets XLA split the computation that produces it (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim == 0:
        return x
    axes = tuple(a for a in MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= int(mesh.shape[a])
    if n == 1 or x.shape[0] % n:
        return x
    spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def mesh_context(mesh: jax.sharding.Mesh | None):
    """``jax.set_mesh(mesh)``, or a no-op context for ``None`` (single device)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


class MeshJitted:
    """A jitted function that is traced, lowered and called inside its mesh's context.

    Behaves like the ``jax.jit`` object it wraps (``__call__``, ``lower``, ``eval_shape``,
    ``trace``); ``mesh`` None is a plain jit."""

    def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh | None):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with mesh_context(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with mesh_context(self.mesh):
            return self.jitted.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with mesh_context(self.mesh):
            return self.jitted.trace(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        with mesh_context(self.mesh):
            return self.jitted.eval_shape(*args, **kwargs)


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
    out_shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """``jax.jit`` for library kernels (decorator or call); configs and k are static
    (names and positions are inferred from each other, as ``jax.jit`` does).

    ``out_shardings`` pins the outputs' layout (the sampler's batch on a mesh); ``mesh`` makes
    the kernel run in that mesh's context (:class:`MeshJitted`)."""

    def wrap(f: Callable) -> Callable:
        kwargs: dict[str, Any] = {"static_argnums": static_argnums, "static_argnames": static_argnames}
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        jitted = jax.jit(f, **kwargs)
        return jitted if mesh is None else MeshJitted(jitted, mesh)

    return wrap if fn is None else wrap(fn)


def compile_step(
    step: Callable,
    *,
    donate_state: bool = True,
    in_shardings: Any = None,
    out_shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable:
    """Compile ``step(state, batch) -> (state, metrics)``: the state (argument 0) is donated;
    ``in_shardings`` / ``out_shardings`` (pytrees of ``jax.sharding.Sharding`` matching
    ``(state, batch)`` / ``(state, metrics)``, or prefixes of them) pin the layout on a mesh,
    and ``mesh`` makes the step trace and run in that mesh's context (the sharded top-k reads
    it). Without a mesh this is ``jax.jit(step, donate_argnums=0)``."""
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate_state else ()}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    jitted = jax.jit(step, **kwargs)
    return jitted if mesh is None else MeshJitted(jitted, mesh)


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


__all__ = ["DATA", "MODEL", "MESH_AXES", "compiled", "compile_step", "mesh_axis_size", "spread_rows", "mesh_context",
           "MeshJitted", "resolve_step_strategy", "STEP_STRATEGIES", "SPARSE_STEP_BACKENDS",
           "AUTO_SPARSE_MAX_FRACTION", "enable_persistent_cache"]
