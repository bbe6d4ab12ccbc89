"""Plan a run on a mesh: compile the train step without running it and read its memory.

:func:`plan_training` builds the abstract train state, batch and sampler data of a config
(``jax.ShapeDtypeStruct`` leaves with the mesh's shardings: nothing is allocated), lowers and
compiles the sampler and the train step exactly as training does, and reports per-device
bytes from ``compiled.memory_analysis()``:

* ``parameters`` / ``optimizer state`` / ``other state``: the state's shards on one device;
* ``batch``: the step's input batch on one device;
* ``step temporaries``: XLA's temporaries of the step (activations, gradients, workspace);
* ``step peak``: arguments + outputs - donated aliases + temporaries, an upper bound of what
  the step holds at once;
* the sampler's resident data (its row arrays, split over the mesh) and temporaries.

:func:`activation_gathers` lists the all-gather ops of the compiled step whose result holds
full-width rows of the (B, D) activation: the latent-sharded top-k keeps this list empty.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding as SH
from ..config import RunConfig
from .compiled import abstract_train_data, compile_training
from .sampling import TrainData
from .state import init_train_state
from .step import StepSpec, make_optimizer

TARGETS = 8  # top targets per hidden state in a dataset


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """Per-device bytes of a compiled run (see the module docstring)."""

    mesh: tuple[int, int]
    platform: str
    d_model: int
    d_features: int
    k: int
    batch_size: int
    vocab_rows: int
    params: int
    opt_state: int
    other_state: int
    batch: int
    step_arguments: int
    step_outputs: int
    step_aliased: int
    step_temporaries: int
    sampler_data: int
    sampler_temporaries: int
    activation_gathers: tuple[str, ...]
    compile_seconds: float

    @property
    def step_peak(self) -> int:
        return self.step_arguments + self.step_outputs - self.step_aliased + self.step_temporaries

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["step_peak"] = self.step_peak
        out["activation_gathers"] = list(self.activation_gathers)
        return out


def _shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` laid out with ``shardings`` (the largest shard)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = sharding.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_inputs(cfg: RunConfig, d_model: int, vocab_rows: int, n_hidden: int | None = None) -> tuple[StepSpec, TrainData]:
    """The step spec and the sampler's data (``ShapeDtypeStruct`` leaves) a run of ``cfg`` on
    a readout of ``vocab_rows`` x ``d_model`` with ``n_hidden`` train hidden states would have
    (default: ``data.max_hidden``, else 2048)."""
    n_hidden = int(n_hidden or cfg.data.max_hidden or 2048)
    spec = StepSpec.build(cfg.factorizer, cfg.training, d_model, n_hidden, TARGETS, sharded=True)
    f32 = jnp.float32

    def sds(shape, dtype=f32):
        return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)

    n_targets = min(n_hidden * spec.prism_ranks, vocab_rows)  # distinct prism target rows, at most
    data = TrainData(
        rows_normalized=sds((vocab_rows, d_model)), row_norms=sds((vocab_rows,)), row_mean=sds((d_model,)),
        hidden=sds((n_hidden, d_model)), top_targets=sds((n_hidden, spec.prism_ranks), jnp.int32),
        target_rows=sds((n_targets, d_model)), target_slots=sds((n_hidden, spec.prism_ranks), jnp.int32),
        sample_logits=sds((vocab_rows,)), row_cdf=sds((vocab_rows,), jnp.uint32),
    )  # fmt: skip
    return spec, data


def plan_training(
    cfg: RunConfig,
    *,
    data: int,
    model: int,
    d_model: int,
    vocab_rows: int,
    n_hidden: int | None = None,
    devices: Any = None,
) -> PlanReport:
    """Compile ``cfg``'s sampler and train step on a (``data``, ``model``) mesh (the first
    data*model of ``devices``, default ``jax.devices()``) and report per-device memory."""
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        from ..errors import ConfigError

        raise ConfigError(f"a {data} x {model} mesh needs {data * model} devices; this process has {len(devices)}")
    mesh = SH.make_mesh(data, model, devices[: data * model])
    spec, host_data = abstract_inputs(cfg, d_model, vocab_rows, n_hidden)
    optimizer = make_optimizer(cfg.training)
    placed = abstract_train_data(host_data, mesh)

    def fresh(rows: Any):
        return init_train_state(cfg.init_seed, cfg.factorizer, cfg.training, d_model, optimizer, rows, None)

    state = jax.eval_shape(fresh, host_data.rows_normalized)
    t0 = time.perf_counter()
    fns = compile_training(spec, optimizer, mesh=mesh, state=state, data=placed, approx_recall=cfg.mesh.approx_recall)
    state_in = SH.with_shardings(state, fns.state_shardings)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=SH.replicated(mesh))
    sampler = fns.sample.lower(placed, rng, 1).compile()
    batch = jax.eval_shape(fns.sample.jitted, placed, rng, 1)
    batch_in = SH.with_shardings(batch, fns.batch_shardings)
    step = fns.step.lower(state_in, batch_in).compile()
    seconds = time.perf_counter() - t0
    mem, smem = step.memory_analysis(), sampler.memory_analysis()
    sh = fns.state_shardings
    params = _shard_bytes(state.params, sh.params)
    opt = _shard_bytes(state.opt_state, sh.opt_state)
    whole = _shard_bytes(state, sh)
    gathers = activation_gathers(step.as_text(), cfg.training.batch_size, cfg.factorizer.d_features)
    return PlanReport(
        mesh=(data, model), platform=devices[0].platform, d_model=int(d_model), d_features=cfg.factorizer.d_features,
        k=spec.k, batch_size=cfg.training.batch_size, vocab_rows=int(vocab_rows), params=params, opt_state=opt,
        other_state=whole - params - opt, batch=_shard_bytes(batch, fns.batch_shardings),
        step_arguments=int(mem.argument_size_in_bytes), step_outputs=int(mem.output_size_in_bytes),
        step_aliased=int(mem.alias_size_in_bytes), step_temporaries=int(mem.temp_size_in_bytes),
        sampler_data=_shard_bytes(placed, fns.data_shardings), sampler_temporaries=int(smem.temp_size_in_bytes),
        activation_gathers=tuple(gathers), compile_seconds=seconds,
    )  # fmt: skip


_GATHER = re.compile(r"=\s*\(?\s*((?:[a-z0-9]+\[[0-9,]*\][^ ]*\s*,?\s*)+)\)?\s*all-gather(?:-start)?\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def activation_gathers(hlo_text: str, batch: int, d_features: int) -> list[str]:
    """The all-gather ops in ``hlo_text`` whose result has a full-width latent axis (size
    ``d_features``) beside a batch-like axis (any size > 1 that divides ``batch``): a gathered
    (B, D) activation or a block of its rows."""
    found = []
    for line in hlo_text.splitlines():
        if "all-gather" not in line:
            continue
        match = _GATHER.search(line)
        if not match:
            continue
        for dims_text in _SHAPE.findall(match.group(1)):
            dims = [int(x) for x in dims_text.split(",") if x]
            if d_features in dims and any(x > 1 and batch % x == 0 and x != d_features for x in dims):
                found.append(line.strip()[:200])
                break
    return found


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def format_report(r: PlanReport) -> str:
    """The human-readable table ``srp-jax plan`` prints."""
    rows = [
        ("mesh (data x model)", f"{r.mesh[0]} x {r.mesh[1]} on {r.mesh[0] * r.mesh[1]} {r.platform} devices"),
        ("dictionary", f"D={r.d_features} x d={r.d_model}, k={r.k}, batch {r.batch_size}, {r.vocab_rows} rows"),
        ("parameters", _gb(r.params)),
        ("optimizer state", _gb(r.opt_state)),
        ("other state", _gb(r.other_state)),
        ("batch", _gb(r.batch)),
        ("step temporaries (activations, grads)", _gb(r.step_temporaries)),
        ("step peak", _gb(r.step_peak)),
        ("sampler data (resident)", _gb(r.sampler_data)),
        ("sampler temporaries", _gb(r.sampler_temporaries)),
        ("all-gathers of (B, D) activations", str(len(r.activation_gathers)) if r.activation_gathers else "none"),
        ("compile time", f"{r.compile_seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["per-device memory of the compiled train step", ""]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    lines += [f"    {g}" for g in r.activation_gathers[:5]]
    return "\n".join(lines)



__all__ = ["PlanReport", "plan_training", "abstract_inputs", "activation_gathers", "format_report"]
