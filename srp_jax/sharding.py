"""Meshes, partition rules and placement: how srp-jax lays arrays out over devices.

**The mesh** has two axes (:data:`srp_jax.compile.MESH_AXES`): ``data`` splits the batch
(training rows; evaluated vocabulary rows) and ``model`` splits the latent axis D. The
``mesh:`` config block gives their sizes (``-1`` = all the devices the other axis leaves);
their product must be ``jax.device_count()`` (every device of every host).

**Partition rules** map a leaf's path name (``params/encoder/kernel``,
``opt_state/1/0/mu/decoder``, ``since_fired``, ``x``, ``prism/h``) to a ``PartitionSpec``;
the first rule whose regular expression matches (``re.search``) wins. Parameters
(:func:`param_rules`)::

    encoder/kernel (d, D)  -> P(None, 'model')
    encoder/bias   (D,)    -> P('model')
    decoder        (D, d)  -> P('model', None)
    <extra> (D,) params    -> P('model')      (the architecture's ``extra_params`` names)
    since_fired    (D,)    -> P('model')
    anything else          -> P()             (scalars: step, rng, buffers, optimizer counts)

The optimizer state mirrors the parameters (optax's ``mu/encoder/kernel`` matches
``encoder/kernel``). The batch (:data:`BATCH_RULES`) is split on ``data``; the sampler's
row arrays are split by rows over the whole mesh (:func:`rows_spec`).

**Placement** (:func:`place`) builds global arrays shard by shard from host data
(``jax.make_array_from_callback``): no device ever holds a full copy, on one host or many.
**Multi-host** (:func:`initialize_distributed`) starts ``jax.distributed`` from options,
``SRP_*`` environment variables or the cluster JAX detects (Cloud TPU, SLURM, ...).
See ``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .compile import DATA, MESH_AXES, MODEL, mesh_context
from .config import FactorizerConfig, MeshConfig
from .errors import ConfigError

Rules = tuple[tuple[str, P], ...]

#: the batch of one step (:class:`srp_jax.train.sampling.Batch`)
BATCH_RULES: Rules = (
    (r"^x$", P(DATA, None)),
    (r"^prism/(h|x|w)$", P(DATA, None)),
    (r"^prism/a$", P(DATA)),
    (r".*", P()),
)


# --------------------------------------------------------------------------------------------
# Meshes


def resolve_mesh_shape(mesh: MeshConfig | Mapping[str, int] | None, n_devices: int) -> tuple[int, int]:
    """(data, model) sizes for ``n_devices`` devices; ``-1`` fills with what the other axis
    leaves. Raises :class:`ConfigError` unless data * model == n_devices."""
    if mesh is None:
        mesh = MeshConfig()
    elif isinstance(mesh, Mapping):
        mesh = MeshConfig(**dict(mesh))
    data, model = int(mesh.data), int(mesh.model)
    if data == -1 and model == -1:
        raise ConfigError("mesh.data and mesh.model cannot both be -1")
    if model == -1:
        if n_devices % data:
            raise ConfigError(f"mesh.data={data} does not divide the {n_devices} devices (jax.device_count())")
        model = n_devices // data
    if data == -1:
        if n_devices % model:
            raise ConfigError(f"mesh.model={model} does not divide the {n_devices} devices (jax.device_count())")
        data = n_devices // model
    if data * model != n_devices:
        raise ConfigError(
            f"mesh data={data} x model={model} = {data * model} devices, but jax.device_count() is {n_devices} "
            "(use -1 for one axis to fill the rest)"
        )
    return data, model


def make_mesh(data: int, model: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all devices, in the topology-aware
    order of ``jax.make_mesh``). Axis types are Auto: XLA propagates shardings inside jit."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    if devices is None:
        return jax.make_mesh((data, model), MESH_AXES, axis_types=auto)
    devs = np.asarray(list(devices), dtype=object)
    if devs.size != data * model:
        raise ConfigError(f"a {data} x {model} mesh needs {data * model} devices, got {devs.size}")
    return Mesh(devs.reshape(data, model), MESH_AXES, axis_types=auto)


def mesh_from_config(mesh: MeshConfig | Mapping[str, int] | None, devices: Sequence[Any] | None = None) -> Mesh | None:
    """The mesh a run uses, or None when it would hold a single device (the plain path)."""
    n = len(devices) if devices is not None else jax.device_count()
    data, model = resolve_mesh_shape(mesh, n)
    if data * model == 1:
        return None
    return make_mesh(data, model, devices)


def mesh_shape(mesh: Mesh | None) -> tuple[int, int]:
    """(data, model) of ``mesh`` ((1, 1) for None)."""
    if mesh is None:
        return 1, 1
    return int(mesh.shape[DATA]), int(mesh.shape[MODEL])


# --------------------------------------------------------------------------------------------
# Partition rules


def param_rules(fcfg: FactorizerConfig | None = None) -> Rules:
    """The partition rules of a train state / dictionary for ``fcfg``'s architecture (its
    ``extra_params`` names are the (D,) rules beside encoder/decoder)."""
    extras = tuple(fcfg.arch.extra_params) if fcfg is not None else ()
    rules: list[tuple[str, P]] = [
        (r"(^|/)encoder/kernel$", P(None, MODEL)),
        (r"(^|/)encoder/bias$", P(MODEL)),
        (r"(^|/)decoder$", P(MODEL, None)),
    ]
    if extras:
        rules.append((r"(^|/)(" + "|".join(re.escape(n) for n in extras) + r")$", P(MODEL)))
    rules += [(r"^since_fired$", P(MODEL)), (r".*", P())]
    return tuple(rules)


def path_name(path: Sequence[Any]) -> str:
    """``params/encoder/kernel`` for a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:  # FlattenedIndexKey and friends
            parts.append(str(getattr(key, "key", key)))
    return "/".join(parts)


def spec_for(name: str, rules: Rules) -> P:
    """The ``PartitionSpec`` of the first rule matching ``name`` (``P()`` when none does)."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec
    return P()


def tree_specs(tree: Any, rules: Rules) -> Any:
    """A pytree of ``PartitionSpec`` shaped like ``tree`` (leaves: arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: spec_for(path_name(path), rules), tree)


def _fits(shape: Sequence[int], spec: P, mesh: Mesh) -> str | None:
    """None when ``spec`` splits ``shape`` evenly on ``mesh``, else the first problem."""
    if len(spec) > len(shape):
        return f"spec {spec} has more entries than the array's {len(shape)} axes"
    for axis, entry in enumerate(spec):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        parts = int(np.prod([mesh.shape[n] for n in names]))
        if shape[axis] % parts:
            return f"axis {axis} (size {shape[axis]}) is not divisible by mesh {'x'.join(names)} = {parts}"
    return None


def tree_shardings(mesh: Mesh, tree: Any, rules: Rules, *, strict: bool = True, what: str = "") -> Any:
    """``NamedSharding`` per leaf of ``tree`` from ``rules``. A leaf the rule cannot split
    evenly raises :class:`ConfigError` (``strict``), or is replicated (not ``strict``)."""

    def one(path, leaf):
        name = path_name(path)
        spec = spec_for(name, rules)
        problem = _fits(np.shape(leaf), spec, mesh)
        if problem is not None:
            if strict:
                raise ConfigError(f"{what}{name} {tuple(np.shape(leaf))}: {problem} (rule {spec})")
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(mesh: Mesh, state: Any, fcfg: FactorizerConfig) -> Any:
    """Shardings of a :class:`~srp_jax.train.state.TrainState` (or a params / buffers tree)
    for ``fcfg``; D must be divisible by ``mesh.model``."""
    return tree_shardings(mesh, state, param_rules(fcfg), what="train state ")


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    """Shardings of a step's batch: rows on ``data`` (the batch size must divide evenly;
    a prism batch that does not is replicated)."""
    x_sharding = tree_shardings(mesh, {"x": batch.x}, BATCH_RULES, what="batch ")  # strict: B % data
    out = tree_shardings(mesh, batch, BATCH_RULES, strict=False)
    return out.replace(x=x_sharding["x"])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_spec(n_rows: int, mesh: Mesh, axes: Sequence[str] = MESH_AXES) -> P:
    """Split a (n_rows, ...) array's rows over as many of ``axes`` as divide it evenly
    (all of them first, then ``data``, then ``model``), else replicate."""
    for group in (tuple(axes), *((a,) for a in axes)):
        parts = int(np.prod([mesh.shape[a] for a in group]))
        if parts > 1 and n_rows % parts == 0:
            return P(group if len(group) > 1 else group[0])
    return P()


# --------------------------------------------------------------------------------------------
# Placement


def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array with ``sharding`` built from host data shard by shard: each process
    reads only the slices its devices hold, so no device sees the whole array (works on one
    or many hosts; every host must pass the same ``value``)."""
    if isinstance(value, jax.Array):
        if value.sharding == sharding:
            return value
        if len(value.sharding.device_set) > 1 or not value.is_fully_addressable:
            return jax.device_put(value, sharding)  # device to device: a reshard, no host copy
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_tree(tree: Any, shardings: Any) -> Any:
    """:func:`place` over a pytree (``shardings`` a matching tree, or one Sharding)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda v: place(v, shardings), tree)
    return jax.tree.map(place, tree, shardings)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (Orbax restore targets, or
    inputs for ``jit(...).lower``)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), abstract, shardings)


def sharded_init(fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
    """Run an initialiser ``fn(*args)`` under jit with ``out_shardings``: every device
    computes only its own shards (no full copy on one device)."""
    return jax.jit(fn, out_shardings=shardings)(*args)


# --------------------------------------------------------------------------------------------
# Multi-host


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How to start ``jax.distributed``: ``mode`` ``auto`` (initialise when options or
    ``SRP_*`` variables name a coordinator, or JAX detects a cluster — Cloud TPU, SLURM,
    Open MPI, Kubernetes), ``on`` (always; fail when it cannot) or ``off``.
    ``coordinator`` ``host:port`` of process 0, ``num_processes``, ``process_id``."""

    mode: str = "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_env(cls, mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, env: Mapping[str, str] | None = None) -> DistributedOptions:
        """Options with unset fields taken from ``SRP_COORDINATOR_ADDRESS``,
        ``SRP_NUM_PROCESSES``, ``SRP_PROCESS_ID`` (and ``SRP_DISTRIBUTED`` for the mode)."""
        env = os.environ if env is None else env

        def num(name: str, value: int | None) -> int | None:
            if value is not None:
                return int(value)
            text = env.get(name)
            if text in (None, ""):
                return None
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None

        mode = env.get("SRP_DISTRIBUTED", mode) if mode == "auto" else mode
        if mode not in ("auto", "on", "off"):
            raise ConfigError(f"distributed mode must be auto, on or off, got {mode!r}")
        return cls(
            mode=mode,
            coordinator=coordinator or env.get("SRP_COORDINATOR_ADDRESS") or None,
            num_processes=num("SRP_NUM_PROCESSES", num_processes),
            process_id=num("SRP_PROCESS_ID", process_id),
        )


def initialize_distributed(options: DistributedOptions | None = None) -> bool:
    """Start ``jax.distributed`` per ``options`` (before any other JAX call). Returns True
    when this is a multi-process run. On CPU, collectives go through gloo."""
    options = options or DistributedOptions.from_env()
    if options.mode == "off":
        return False
    explicit = options.coordinator is not None or options.num_processes is not None or options.process_id is not None
    if explicit and None in (options.coordinator, options.num_processes, options.process_id):
        raise ConfigError("a multi-process run needs all of --coordinator, --num-processes and --process-id "
                          "(or SRP_COORDINATOR_ADDRESS, SRP_NUM_PROCESSES, SRP_PROCESS_ID)")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests); TPUs ignore it
    try:
        if explicit:
            jax.distributed.initialize(options.coordinator, int(options.num_processes), int(options.process_id))
        else:
            jax.distributed.initialize()
    except ValueError as exc:  # no cluster detected: a single-process run
        if options.mode == "on":
            raise ConfigError(f"cannot start jax.distributed: {exc}") from None
        return False
    except RuntimeError as exc:  # JAX already running in this process (e.g. a CLI call from Python)
        if explicit or options.mode == "on":
            raise ConfigError(f"cannot start jax.distributed: {str(exc).splitlines()[0]}") from None
        return False
    return jax.process_count() > 1


def is_primary() -> bool:
    """True on process 0: the one that logs and writes run files."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """A barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True on any process (every process must call this: in a
    multi-process run it is a small collective; alone, ``flag`` itself)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def to_host(tree: Any) -> Any:
    """Every leaf as a full host NumPy array, on every process (a collective gather for
    arrays spread over hosts: every process must call it, in the same order)."""

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


__all__ = [
    "BATCH_RULES",
    "mesh_context",
    "resolve_mesh_shape",
    "make_mesh",
    "mesh_from_config",
    "mesh_shape",
    "param_rules",
    "path_name",
    "spec_for",
    "tree_specs",
    "tree_shardings",
    "state_shardings",
    "batch_shardings",
    "replicated",
    "rows_spec",
    "place",
    "place_tree",
    "with_shardings",
    "sharded_init",
    "DistributedOptions",
    "initialize_distributed",
    "is_primary",
    "sync_processes",
    "any_process",
    "to_host",
]
