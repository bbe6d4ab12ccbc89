"""The compiled training functions: the sampler and the donated train step, jitted once.

:func:`compile_training` is where the loop gets its callables; the jit policy itself (state
donation, shardings once a mesh is in use) is :func:`srp_jax.compile.compile_step`. On a mesh
(``mesh=``) the layout is (see ``docs/scaling.md``):

* the train state: the partition rules of :func:`srp_jax.sharding.param_rules` (D on
  ``model``; scalars replicated);
* the batch: rows on ``data`` (the sampler's outputs carry these shardings, so the step never
  reshuffles them);
* the sampler's data (:func:`place_train_data`): the row tables (rows_normalized,
  row_norms, and target_rows, the prism targets' raw rows) split by rows over the whole mesh
  (each zero-padded to a multiple of the device count: padding rows are never read, since
  draws index only real rows); the sampling logits, hidden states and targets replicated.

Every device computes only its slice of the global batch, which is a pure function of
(seed, step): the draws, and so the results, do not depend on the mesh or the host count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from .. import sharding as SH
from ..compile import compile_step, compiled, resolve_step_strategy
from ..factorizers.sharded_topk import approximate_topk
from .sampling import TrainData
from .state import TrainState, init_train_state
from .step import StepSpec, make_optimizer, make_train_step, sample_batch_for


@dataclasses.dataclass(frozen=True)
class CompiledTraining:
    """``sample(data, rng, step) -> batch`` and ``step(state, batch) -> (state, metrics)``
    (the state argument is donated: do not reuse it after the call). On a mesh, ``mesh`` and
    the shardings of the state, the batch and the sampler's data are recorded."""

    spec: StepSpec
    optimizer: optax.GradientTransformation
    sample: Callable
    step: Callable
    mesh: Mesh | None = None
    state_shardings: Any = None
    batch_shardings: Any = None
    data_shardings: Any = None


def _with_topk(fn: Callable, recall: float | None) -> Callable:
    """``fn`` traced inside :func:`approximate_topk` (``recall`` None: ``fn`` itself)."""
    if recall is None:
        return fn

    def traced(*args):
        with approximate_topk(recall):
            return fn(*args)

    return traced


def compile_training(
    spec: StepSpec,
    optimizer: optax.GradientTransformation | None = None,
    *,
    mesh: Mesh | None = None,
    state: Any = None,
    data: Any = None,
    approx_recall: float | None = None,
) -> CompiledTraining:
    """Jit the sampler and the train step for ``spec`` (the optimizer built once, shared).

    With ``mesh``, ``state`` and ``data`` (concrete or ``jax.eval_shape`` trees; ``data`` as
    returned by :func:`place_train_data`) give the shapes the shardings are derived from.
    ``approx_recall`` (``mesh.topk: approx_max_k``) makes the step's top-k approximate."""
    optimizer = make_optimizer(spec.training) if optimizer is None else optimizer
    step_fn = _with_topk(make_train_step(spec, optimizer), approx_recall)
    sample_fn = partial(sample_batch_for, spec)
    if mesh is None:
        return CompiledTraining(spec=spec, optimizer=optimizer, sample=compiled(sample_fn), step=compile_step(step_fn))
    if state is None or data is None:
        raise ValueError("compile_training on a mesh needs the state and data trees (concrete or abstract)")
    state_sh = SH.state_shardings(mesh, state, spec.factorizer)
    data_sh = train_data_shardings(mesh, data)
    batch = jax.eval_shape(sample_fn, data, state.rng, 1)
    batch_sh = SH.batch_shardings(mesh, batch)
    sample = compiled(sample_fn, out_shardings=batch_sh, mesh=mesh)
    step = compile_step(
        step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, SH.replicated(mesh)), mesh=mesh
    )
    return CompiledTraining(
        spec=spec, optimizer=optimizer, sample=sample, step=step, mesh=mesh,
        state_shardings=state_sh, batch_shardings=batch_sh, data_shardings=data_sh,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The sampler's data on a mesh

#: the sampler's row tables, split by rows over the whole mesh (each padded to its own length)
_ROW_FIELDS = ("rows_normalized", "row_norms", "target_rows")


def padded_rows(n_rows: int, mesh: Mesh) -> int:
    """``n_rows`` rounded up to a multiple of the mesh's device count."""
    n = mesh.devices.size
    return -(-int(n_rows) // n) * n


def train_data_shardings(mesh: Mesh, data: Any) -> Any:
    """Shardings of a (padded) :class:`TrainData`: the row tables (:data:`_ROW_FIELDS`) split
    by rows over the whole mesh, every other leaf replicated."""
    rep = SH.replicated(mesh)
    rows = {name: NamedSharding(mesh, SH.rows_spec(np.shape(getattr(data, name))[0], mesh)) for name in _ROW_FIELDS}
    return jax.tree.map(lambda _: rep, data).replace(**rows)


def _pad_rows(data: Any, mesh: Mesh, pad: Callable[[Any, int], Any]) -> Any:
    return data.replace(**{
        name: pad(getattr(data, name), padded_rows(np.shape(getattr(data, name))[0], mesh)) for name in _ROW_FIELDS
    })  # fmt: skip


def place_train_data(data: TrainData, mesh: Mesh | None) -> TrainData:
    """``data`` on ``mesh`` (unchanged without one): the row tables zero-padded to
    a multiple of the device count and split by rows; every host passes the same host data
    and keeps its slices (:func:`srp_jax.sharding.place`)."""
    if mesh is None:
        return data

    def pad(a: Any, Vp: int) -> np.ndarray:
        a = np.asarray(a)
        extra = Vp - a.shape[0]
        return a if extra == 0 else np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])

    host = _pad_rows(data, mesh, pad)
    return SH.place_tree(host, train_data_shardings(mesh, host))


def abstract_train_data(data: TrainData, mesh: Mesh) -> TrainData:
    """``jax.ShapeDtypeStruct`` leaves of :func:`place_train_data`'s result (nothing placed:
    ``data`` may itself hold ShapeDtypeStructs)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), data)
    padded = _pad_rows(shapes, mesh, lambda a, Vp: jax.ShapeDtypeStruct((Vp, *a.shape[1:]), a.dtype))
    return SH.with_shardings(padded, train_data_shardings(mesh, padded))


# --------------------------------------------------------------------------------------------
# Everything a run needs, on one device or a mesh


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What :func:`setup_training` builds: the compiled functions, the sampler's data (placed),
    ``init()`` -> a fresh state (sharded on a mesh: each device computes only its shards) and
    ``abstract`` (the state's ShapeDtypeStructs, with shardings on a mesh: the restore target)."""

    fns: CompiledTraining
    data: TrainData
    init: Callable[[], TrainState]
    abstract: TrainState

    @property
    def mesh(self) -> Mesh | None:
        return self.fns.mesh


def setup_training(
    spec: StepSpec,
    optimizer: optax.GradientTransformation,
    dataset: Any,
    sample_weights: Any,
    *,
    init_seed: int,
    mesh: Mesh | None = None,
    approx_recall: float | None = None,
) -> TrainingSetup:
    """Place the data, compile the functions and prepare the initialiser for ``spec`` on
    ``mesh`` (None: one device, the plain path). On a mesh the step is the dense one (its
    partition rules are written for the dense products): a spec that resolved ``auto`` to
    sparse without knowing of the mesh is switched to dense; an explicit ``sparse`` is refused."""
    fcfg, tcfg = spec.factorizer, spec.training
    if mesh is not None and spec.strategy == "sparse":  # a spec resolved without knowing of the mesh
        strategy = resolve_step_strategy(tcfg.step_strategy, sparse_supported=True, sharded=True)  # refuses 'sparse'
        spec = dataclasses.replace(spec, strategy=strategy)
    data = place_train_data(TrainData.from_dataset(dataset, sample_weights, spec.prism_ranks, host=mesh is not None), mesh)

    def fresh(rows: Any) -> TrainState:
        return init_train_state(init_seed, fcfg, tcfg, spec.d_model, optimizer, rows, sample_weights)

    rows = dataset.rows_normalized if mesh is None else data.rows_normalized
    abstract = jax.eval_shape(fresh, rows)
    fns = compile_training(spec, optimizer, mesh=mesh, state=abstract, data=data, approx_recall=approx_recall)
    if mesh is None:
        return TrainingSetup(fns=fns, data=data, init=lambda: fresh(rows), abstract=abstract)
    return TrainingSetup(
        fns=fns, data=data, init=lambda: SH.sharded_init(fresh, fns.state_shardings, rows),
        abstract=SH.with_shardings(abstract, fns.state_shardings),
    )  # fmt: skip


__all__ = [
    "TrainingSetup",
    "setup_training",
    "CompiledTraining",
    "compile_training",
    "place_train_data",
    "train_data_shardings",
    "abstract_train_data",
    "padded_rows",
]
