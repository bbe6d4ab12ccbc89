"""The compiled training functions: the sampler and the donated train step, jitted once.

:func:`compile_training` is where the loop gets its callables; the jit policy itself (state
donation, shardings once a mesh is in use) is :func:`srp_jax.compile.compile_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import optax

from ..compile import compile_step, compiled
from .step import StepSpec, make_optimizer, make_train_step, sample_batch_for


@dataclasses.dataclass(frozen=True)
class CompiledTraining:
    """``sample(data, rng, step) -> batch`` and ``step(state, batch) -> (state, metrics)``
    (the state argument is donated: do not reuse it after the call)."""

    spec: StepSpec
    optimizer: optax.GradientTransformation
    sample: Callable
    step: Callable


def compile_training(spec: StepSpec, optimizer: optax.GradientTransformation | None = None) -> CompiledTraining:
    """Jit the sampler and the train step for ``spec`` (the optimizer built once, shared)."""
    optimizer = make_optimizer(spec.training) if optimizer is None else optimizer
    sample = compiled(partial(sample_batch_for, spec))
    step = compile_step(make_train_step(spec, optimizer))
    return CompiledTraining(spec=spec, optimizer=optimizer, sample=sample, step=step)


__all__ = ["CompiledTraining", "compile_training"]
