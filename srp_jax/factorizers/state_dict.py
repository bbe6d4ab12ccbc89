"""PyTorch state-dict names <-> (params, buffers) pytrees, derived from each architecture's
declared parameters and buffers (the one place that knows the mapping).

torch orders a ``state_dict`` as: own parameters, own buffers, then child modules, so every
architecture's keys are ``decoder``, its extra parameters, its buffers, ``encoder.weight``,
``encoder.bias``. ``encoder.weight`` (D, d) is the transposed kernel (d, D); integer buffers
(flags) are int64 in ``.pt`` files and int32 here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._arrays import to_numpy
from ..errors import MissingKeyError, ShapeError, StateDictShapeError, UnexpectedKeyError
from .kernels import Buffers, Params
from .registry import get_architecture


def _architecture_of(cfg_or_name: Any):
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.architecture
    return get_architecture(name)


def state_dict_keys(architecture: Any) -> tuple[str, ...]:
    """The reference ``state_dict`` keys of an architecture (name or config), in torch order."""
    arch = _architecture_of(architecture)
    return ("decoder", *arch.extra_params, *arch.buffers, "encoder.weight", "encoder.bias")


def buffer_keys(architecture: Any) -> tuple[str, ...]:
    """The state-dict keys that are buffers (not trained parameters)."""
    return tuple(_architecture_of(architecture).buffers)


def int_buffer_keys(architecture: Any) -> tuple[str, ...]:
    """The integer (flag) buffers: int32 here, int64 in ``.pt`` files."""
    return tuple(name for name, spec in _architecture_of(architecture).buffers.items() if spec.dtype.startswith("int"))


def expected_shapes(cfg: Any, d_model: int) -> dict[str, tuple[int, ...]]:
    """Reference state-dict key -> shape."""
    arch = _architecture_of(cfg)
    D, d = cfg.d_features, int(d_model)
    shapes = {"decoder": (D, d), **{name: (D,) for name in arch.extra_params}, **{name: () for name in arch.buffers}}
    shapes.update({"encoder.weight": (D, d), "encoder.bias": (D,)})
    return {key: shapes[key] for key in state_dict_keys(arch.name)}


def state_dict_to_variables(
    state: Mapping[str, Any], cfg: Any, d_model: int, *, source: str = "state dict", dtype=None
) -> tuple[Params, Buffers]:
    """Map a reference ``state_dict`` (arrays of any array-like) onto (params, buffers).

    Strict like ``load_state_dict``: missing and unexpected keys are named; every shape is
    checked against the config. Floating tensors keep their dtype unless ``dtype`` is given
    (e.g. bfloat16 -> float32).
    """
    arch = _architecture_of(cfg)
    expected = expected_shapes(cfg, d_model)
    ints = set(int_buffer_keys(arch.name))
    missing = [key for key in expected if key not in state]
    unexpected = sorted(key for key in state if key not in expected)
    if missing:
        raise MissingKeyError(f"{source}: missing key(s) for {arch.name}: {', '.join(missing)}")
    if unexpected:
        raise UnexpectedKeyError(f"{source}: unexpected key(s) for {arch.name}: {', '.join(unexpected)}")
    arrays: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        arr = to_numpy(state[key], name=f"{source}[{key!r}]")
        if tuple(arr.shape) != shape:
            raise StateDictShapeError(
                f"{source}: {key!r} has shape {tuple(arr.shape)}, expected {shape} "
                f"(d_model={d_model}, d_features={cfg.d_features})"
            )
        if key in ints:
            arr = arr.astype(np.int32)
        elif dtype is not None:
            arr = arr.astype(dtype)
        elif not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise ShapeError(f"{source}: {key!r} has dtype {arr.dtype}, expected a floating dtype")
        arrays[key] = arr
    params: Params = {
        "encoder": {"kernel": jnp.asarray(arrays["encoder.weight"].T), "bias": jnp.asarray(arrays["encoder.bias"])},
        "decoder": jnp.asarray(arrays["decoder"]),
    }
    for key in arch.extra_params:
        params[key] = jnp.asarray(arrays[key])
    buffers: Buffers = {key: jnp.asarray(arrays[key]) for key in arch.buffers}
    return params, buffers


def variables_to_state_dict(params: Params, buffers: Buffers, cfg: Any) -> dict[str, np.ndarray]:
    """(params, buffers) -> reference ``state_dict`` as NumPy arrays, in torch order.

    The kernel is transposed back to ``encoder.weight`` (D, d); flags become int64 scalars and
    float buffers float32.
    """
    arch = _architecture_of(cfg)
    out: dict[str, np.ndarray] = {}
    for key in state_dict_keys(arch.name):
        if key == "encoder.weight":
            out[key] = np.ascontiguousarray(np.asarray(params["encoder"]["kernel"]).T)
        elif key == "encoder.bias":
            out[key] = np.asarray(params["encoder"]["bias"])
        elif key in arch.buffers:
            dtype = np.int64 if arch.buffers[key].dtype.startswith("int") else np.float32
            out[key] = np.asarray(buffers[key]).astype(dtype)
        else:
            out[key] = np.asarray(params[key])
    return out


__all__ = [
    "state_dict_keys",
    "buffer_keys",
    "int_buffer_keys",
    "expected_shapes",
    "state_dict_to_variables",
    "variables_to_state_dict",
]
