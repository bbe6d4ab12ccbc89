"""The six factorizer architectures as pure functions over parameter and buffer pytrees.

Layout (stable names; partition rules key on them)::

    params  = {"encoder": {"kernel": (d, D), "bias": (D,)},
               "decoder": (D, d),
               # jumprelu: "log_threshold" (D,);  gated: "gate_bias" (D,), "log_r" (D,)
              }
    buffers = {}                                                      # topk, matryoshka_topk, gated, l1_relu
            | {"activation_threshold": f32 (), "threshold_initialized": i32 ()}   # batch_topk
            | {"act_scale_ema": f32 (), "act_scale_init": i32 ()}                # jumprelu

``encode``/``decode`` are the single shared kernels: training, evaluation, decomposition and
conversion all go through them. The semantics are the PyTorch reference's exactly: ReLU
before top-k, zeros outside it, ``k`` = 0/None fall back to the trained k, ``k >= D`` returns
the dense ReLU, strict ``>`` comparisons everywhere.

Top-k ties: ``jax.lax.top_k`` keeps the **lower feature index** among exactly equal values
(``torch.topk`` leaves the order implementation-defined; supports can differ only at exact
ties). Matmuls that decide supports run at ``precision=HIGHEST`` so accelerators reproduce the
float32 reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import ARCHITECTURES, TOPK_FAMILY, FactorizerConfig
from .errors import MissingKeyError, ShapeError, StateDictShapeError, UnexpectedKeyError

HIGHEST = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-8

Params = dict[str, Any]
Buffers = dict[str, Any]


class FactorizerOutput(NamedTuple):
    """What ``forward`` returns (the reference's ``FactorizerBatch`` plus updated buffers).

    reconstruction (B, d); code (B, D) post-sparsity; aux_loss scalar; aux_recon (B, d) for
    gated else None; mean_l0 scalar (the reference's ``info['mean_l0_train']``); buffers the
    buffer pytree after this call (changed only in training mode for batch_topk / jumprelu).
    """

    reconstruction: jax.Array
    code: jax.Array
    aux_loss: jax.Array
    aux_recon: jax.Array | None
    mean_l0: jax.Array
    buffers: Buffers


FactorizerBatch = FactorizerOutput  # the reference's name for a forward's result


# --------------------------------------------------------------------------------------------
# Parameters and buffers


def init_factorizer(key: jax.Array, cfg: FactorizerConfig, d_model: int) -> tuple[Params, Buffers]:
    """Random initialisation with the reference's distributions.

    encoder kernel ~ N(0, encoder_init_scale), encoder bias 0, decoder ~ N(0, d^-1/2) with
    unit-norm rows; jumprelu ``log_threshold`` = log_threshold_init; gated biases 0.
    """
    d, D = int(d_model), cfg.d_features
    k_enc, k_dec = jax.random.split(key)
    params: Params = {
        "encoder": {
            "kernel": cfg.encoder_init_scale * jax.random.normal(k_enc, (d, D), jnp.float32),
            "bias": jnp.zeros((D,), jnp.float32),
        },
        "decoder": normalize_rows(jax.random.normal(k_dec, (D, d), jnp.float32) * d ** -0.5),
    }
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((D,), cfg.log_threshold_init, jnp.float32)
    if cfg.architecture == "gated":
        params["gate_bias"] = jnp.zeros((D,), jnp.float32)
        params["log_r"] = jnp.zeros((D,), jnp.float32)
    return params, init_buffers(cfg)


def init_buffers(cfg: FactorizerConfig) -> Buffers:
    """Fresh buffers: an unset BatchTopK threshold, or a JumpReLU RMS EMA at 1.0."""
    if cfg.architecture == "batch_topk":
        return {"activation_threshold": jnp.zeros((), jnp.float32), "threshold_initialized": jnp.zeros((), jnp.int32)}
    if cfg.architecture == "jumprelu":
        return {"act_scale_ema": jnp.ones((), jnp.float32), "act_scale_init": jnp.zeros((), jnp.int32)}
    return {}


def normalize_rows(matrix: jax.Array) -> jax.Array:
    """Divide each row by max(||row||_2, 1e-8)."""
    norms = jnp.sqrt(jnp.sum(jnp.square(matrix), axis=-1, keepdims=True))
    return matrix / jnp.maximum(norms, NORM_EPS)


def normalize_decoder(params: Params) -> Params:
    """The reference's ``normalize_decoder_``: unit-norm decoder rows (floor 1e-8)."""
    return {**params, "decoder": normalize_rows(params["decoder"])}


# --------------------------------------------------------------------------------------------
# Top-k kernels


def topk_sparse(acts: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest entries per row: ``(values (..., k), indices (..., k))``.

    Ties go to the lower index. ``k`` must satisfy 1 <= k <= acts.shape[-1].
    """
    return jax.lax.top_k(acts, k)


def topk_mask(acts: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` largest activations per row and zero the rest (``k >= D``: unchanged).

    ``k <= 0`` gives an all-zero code (the raw ``encode_topk`` behaviour of the reference).
    """
    D = acts.shape[-1]
    kk = min(int(k), D)
    if kk >= D:
        return acts
    if kk <= 0:
        return jnp.zeros_like(acts)
    values, indices = topk_sparse(acts, kk)
    return scatter_rows(values, indices, D)


def scatter_rows(values: jax.Array, indices: jax.Array, width: int) -> jax.Array:
    """Dense (..., width) rows holding ``values`` at ``indices`` and zeros elsewhere."""
    lead = values.shape[:-1]
    flat_vals = values.reshape(-1, values.shape[-1])
    flat_idx = indices.reshape(-1, indices.shape[-1])
    rows = jnp.arange(flat_vals.shape[0])[:, None]
    dense = jnp.zeros((flat_vals.shape[0], width), values.dtype).at[rows, flat_idx].set(flat_vals)
    return dense.reshape(*lead, width)


# --------------------------------------------------------------------------------------------
# Encode / decode


def pre_activation(params: Params, x: jax.Array, *, bias: bool = True) -> jax.Array:
    """x @ kernel (+ bias) at HIGHEST precision: (B, d) -> (B, D)."""
    z = jnp.matmul(x, params["encoder"]["kernel"], precision=HIGHEST)
    return z + params["encoder"]["bias"] if bias else z


def decode(params: Params, code: jax.Array) -> jax.Array:
    """code @ decoder: (B, D) -> (B, d). No decoder bias (the row mean is the only offset)."""
    return jnp.matmul(code, params["decoder"], precision=HIGHEST)


def decode_sparse(params: Params, values: jax.Array, indices: jax.Array) -> jax.Array:
    """Decode from the active (value, index) pairs only: (B, k), (B, k) -> (B, d).

    Touches k decoder rows per example instead of D; equal to ``decode`` of the scattered code.
    """
    rows = jnp.take(params["decoder"], indices, axis=0)  # (B, k, d)
    return jnp.einsum("bk,bkd->bd", values, rows, precision=HIGHEST)


def encode(
    cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None = None
) -> jax.Array:
    """Eval-mode code (B, D) of normalized rows x (B, d). Pure: buffers are only read.

    batch_topk uses its learned threshold (``acts > threshold``); callers holding concrete
    buffers should check ``threshold_initialized`` first (``check_ready``); jumprelu, gated and
    l1_relu ignore ``k``.
    """
    arch = cfg.architecture
    if arch in TOPK_FAMILY:
        return topk_mask(jax.nn.relu(pre_activation(params, x)), cfg.resolve_k(k))
    if arch == "batch_topk":
        acts = jax.nn.relu(pre_activation(params, x))
        return jnp.where(acts > buffers["activation_threshold"], acts, 0.0)
    if arch == "jumprelu":
        z = jax.nn.relu(pre_activation(params, x))
        return jnp.where(z - jnp.exp(params["log_threshold"]) > 0, z, 0.0)
    if arch == "gated":
        return _gated_parts(params, x)[0]
    if arch == "l1_relu":
        return jax.nn.relu(pre_activation(params, x))
    raise AssertionError(arch)


def check_ready(cfg: FactorizerConfig, buffers: Buffers) -> None:
    """Raise if an eval-mode encode would use a BatchTopK threshold that was never learned."""
    from .errors import ThresholdNotReadyError

    if cfg.architecture != "batch_topk":
        return
    flag = buffers.get("threshold_initialized")
    if isinstance(flag, jax.core.Tracer):
        return
    if flag is None or int(np.asarray(flag)) == 0:
        raise ThresholdNotReadyError(
            "batch_topk has no activation threshold yet (threshold_initialized == 0): "
            "run at least one training-mode encode before eval-mode encoding"
        )


def _gated_parts(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gated encode: (code, gate pre-activation). encoder.bias is the *magnitude* bias."""
    z = pre_activation(params, x, bias=False)
    gate_pre = z + params["gate_bias"]
    mag = jax.nn.relu(jnp.exp(params["log_r"]) * z + params["encoder"]["bias"])
    return jnp.where(gate_pre > 0, mag, 0.0), gate_pre


@jax.custom_vjp
def rectangle_step(u: jax.Array, h: jax.Array) -> jax.Array:
    """Heaviside 1[u > 0] whose backward is the rectangle kernel 1[|u| <= h/2] / max(h, 1e-12)."""
    return (u > 0).astype(u.dtype)


def _rectangle_fwd(u, h):
    return rectangle_step(u, h), (u, h)


def _rectangle_bwd(res, g):
    u, h = res
    kernel = (jnp.abs(u) <= h / 2).astype(u.dtype) / jnp.maximum(h, 1e-12)
    return g * kernel, jnp.zeros_like(h)


rectangle_step.defvjp(_rectangle_fwd, _rectangle_bwd)


def _positive_rms(z: jax.Array) -> jax.Array:
    """sqrt(mean(z[z > 0]^2)) over the whole batch; 1.0 when nothing is positive."""
    pos = z > 0
    n = jnp.sum(pos)
    mean_sq = jnp.sum(jnp.where(pos, z * z, 0.0)) / jnp.maximum(n, 1)
    return jnp.where(n > 0, jnp.sqrt(mean_sq), 1.0).astype(jnp.float32)


def _ema_update(value, initialized, new, momentum):
    """First call copies ``new``; later calls blend ``momentum * value + (1 - momentum) * new``."""
    blended = momentum * value + (1.0 - momentum) * new
    return jnp.where(initialized == 0, new, blended).astype(jnp.float32), jnp.ones_like(initialized)


def _batch_topk_train(cfg: FactorizerConfig, params: Params, buffers: Buffers, x: jax.Array, k: int | None):
    acts = jax.nn.relu(pre_activation(params, x))
    B, D = acts.shape
    kk = min(cfg.resolve_k(k), D)
    n_keep = min(B * kk, B * D)
    if n_keep <= 0:
        return jnp.zeros_like(acts), buffers
    flat = acts.reshape(-1)
    values, indices = jax.lax.top_k(flat, n_keep)
    mask = jnp.zeros_like(flat).at[indices].set(1.0)
    code = (flat * mask).reshape(B, D)
    cutoff = jax.lax.stop_gradient(jnp.min(values))
    thr, flag = _ema_update(
        buffers["activation_threshold"], buffers["threshold_initialized"], cutoff, cfg.threshold_momentum
    )
    return code, {"activation_threshold": thr, "threshold_initialized": flag}


def forward(
    cfg: FactorizerConfig,
    params: Params,
    buffers: Buffers,
    x: jax.Array,
    k: int | None = None,
    *,
    train: bool = False,
) -> FactorizerOutput:
    """Encode, decode and the architecture's auxiliary terms (the reference ``forward``).

    ``train=True`` is the reference's training mode: batch_topk selects the top B*k entries of
    the whole batch and updates its threshold EMA; jumprelu updates its RMS EMA (first, then
    uses it as the STE bandwidth scale). Every other architecture is the same in both modes.
    """
    arch = cfg.architecture
    zero = jnp.zeros((), jnp.float32)
    aux_recon = None
    new_buffers = buffers
    if arch in TOPK_FAMILY or arch == "l1_relu":
        code = encode(cfg, params, buffers, x, k)
        aux = zero
        if arch == "l1_relu":
            dec_norms = jax.lax.stop_gradient(jnp.linalg.norm(params["decoder"], axis=1))
            aux = jnp.mean(jnp.sum(code * dec_norms, axis=-1))
    elif arch == "batch_topk":
        if train:
            code, new_buffers = _batch_topk_train(cfg, params, buffers, x, k)
        else:
            code = encode(cfg, params, buffers, x, k)
        aux = zero
    elif arch == "jumprelu":
        z = jax.nn.relu(pre_activation(params, x))
        scale = buffers["act_scale_ema"]
        if train:
            ema, flag = _ema_update(scale, buffers["act_scale_init"], jax.lax.stop_gradient(_positive_rms(z)), 0.99)
            new_buffers = {"act_scale_ema": ema, "act_scale_init": flag}
            scale = ema
        h = jnp.maximum(cfg.bandwidth * jax.lax.stop_gradient(scale), 1e-8)
        mask = rectangle_step(z - jnp.exp(params["log_threshold"]), h)
        code = z * mask
        aux = jnp.mean(jnp.sum(mask, axis=-1))
    elif arch == "gated":
        code, gate_pre = _gated_parts(params, x)
        gate_act = jax.nn.relu(gate_pre)
        aux = jnp.mean(jnp.sum(gate_act, axis=-1))
        aux_recon = jnp.matmul(gate_act, jax.lax.stop_gradient(params["decoder"]), precision=HIGHEST)
    else:  # pragma: no cover - FactorizerConfig validates the name
        raise AssertionError(arch)
    if arch == "gated":
        mean_l0 = jnp.mean(jnp.sum((gate_pre > 0).astype(jnp.float32), axis=-1))
    else:
        mean_l0 = jnp.mean(jnp.sum((code > 0).astype(jnp.float32), axis=-1))
    return FactorizerOutput(decode(params, code), code, aux, aux_recon, jax.lax.stop_gradient(mean_l0), new_buffers)


class LossTerms(NamedTuple):
    """``reconstruction_loss`` result: rec (scalar MSE), code (B, D), aux (scalar),
    aux_recon_mse (scalar; gated only, else 0), mean_l0 (scalar), buffers (updated)."""

    rec: jax.Array
    code: jax.Array
    aux: jax.Array
    aux_recon_mse: jax.Array
    mean_l0: jax.Array
    buffers: Buffers


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over all B*d elements (``F.mse_loss``)."""
    return jnp.mean(jnp.square(a - b))


def reconstruction_loss(
    cfg: FactorizerConfig,
    params: Params,
    buffers: Buffers,
    x: jax.Array,
    k: int | None = None,
    *,
    train: bool = True,
) -> LossTerms:
    """The reference ``reconstruction_loss``.

    matryoshka_topk with ``k_values``: sum_j w_j MSE(recon at k_j, x) / sum_j w_j, returning
    the code of the last k_j and aux 0. Otherwise MSE of one forward at ``k``; gated adds
    ``aux_recon_mse`` = MSE(aux_recon, x).
    """
    zero = jnp.zeros((), jnp.float32)
    ks, ws = cfg.loss_k_values()
    if cfg.architecture == "matryoshka_topk" and ks:
        total = zero
        out = None
        for kj, wj in zip(ks, ws):
            out = forward(cfg, params, buffers, x, kj, train=train)
            total = total + wj * mse(out.reconstruction, x)
        rec = total / sum(ws)
        return LossTerms(rec, out.code, zero, zero, out.mean_l0, out.buffers)
    out = forward(cfg, params, buffers, x, k, train=train)
    aux_mse = mse(out.aux_recon, x) if out.aux_recon is not None else zero
    return LossTerms(mse(out.reconstruction, x), out.code, out.aux_loss, aux_mse, out.mean_l0, out.buffers)


# --------------------------------------------------------------------------------------------
# PyTorch state-dict names <-> pytrees (the only place that knows the mapping)

_EXTRA_PARAMS = {"jumprelu": ("log_threshold",), "gated": ("gate_bias", "log_r")}
_BUFFERS = {
    "batch_topk": ("activation_threshold", "threshold_initialized"),
    "jumprelu": ("act_scale_ema", "act_scale_init"),
}
INT_BUFFERS = ("threshold_initialized", "act_scale_init")


def state_dict_keys(architecture: str) -> tuple[str, ...]:
    """The reference ``state_dict`` keys of an architecture, in the reference order."""
    if architecture not in ARCHITECTURES:
        from .errors import ConfigError

        raise ConfigError(f"unknown factorizer architecture {architecture!r}")
    # torch orders a state_dict as: own parameters, own buffers, then child modules.
    return (
        "decoder",
        *_EXTRA_PARAMS.get(architecture, ()),
        *_BUFFERS.get(architecture, ()),
        "encoder.weight",
        "encoder.bias",
    )


def expected_shapes(cfg: FactorizerConfig, d_model: int) -> dict[str, tuple[int, ...]]:
    """Reference state-dict key -> shape."""
    D, d = cfg.d_features, int(d_model)
    base = {"encoder.weight": (D, d), "encoder.bias": (D,), "decoder": (D, d)}
    extra = set(_EXTRA_PARAMS.get(cfg.architecture, ()))
    return {key: base.get(key, (D,) if key in extra else ()) for key in state_dict_keys(cfg.architecture)}


def state_dict_to_variables(
    state: Mapping[str, Any], cfg: FactorizerConfig, d_model: int, *, source: str = "state dict", dtype=None
) -> tuple[Params, Buffers]:
    """Map a reference ``state_dict`` (arrays of any array-like) onto (params, buffers).

    Strict like ``load_state_dict``: missing and unexpected keys are named; every shape is
    checked against the config. ``encoder.weight`` (D, d) is transposed to the kernel (d, D).
    Floating tensors keep their dtype unless ``dtype`` is given (e.g. bfloat16 -> float32).
    """
    from ._arrays import to_numpy

    expected = expected_shapes(cfg, d_model)
    missing = [key for key in expected if key not in state]
    unexpected = sorted(key for key in state if key not in expected)
    if missing:
        raise MissingKeyError(f"{source}: missing key(s) for {cfg.architecture}: {', '.join(missing)}")
    if unexpected:
        raise UnexpectedKeyError(f"{source}: unexpected key(s) for {cfg.architecture}: {', '.join(unexpected)}")
    arrays: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        arr = to_numpy(state[key], name=f"{source}[{key!r}]")
        if tuple(arr.shape) != shape:
            raise StateDictShapeError(
                f"{source}: {key!r} has shape {tuple(arr.shape)}, expected {shape} "
                f"(d_model={d_model}, d_features={cfg.d_features})"
            )
        if key in INT_BUFFERS:
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
    for key in _EXTRA_PARAMS.get(cfg.architecture, ()):
        params[key] = jnp.asarray(arrays[key])
    buffers: Buffers = {key: jnp.asarray(arrays[key]) for key in _BUFFERS.get(cfg.architecture, ())}
    return params, buffers


def variables_to_state_dict(params: Params, buffers: Buffers, cfg: FactorizerConfig) -> dict[str, np.ndarray]:
    """(params, buffers) -> reference ``state_dict`` as NumPy arrays, in the reference order.

    The kernel is transposed back to ``encoder.weight`` (D, d); flags become int64 scalars.
    """
    out: dict[str, np.ndarray] = {}
    for key in state_dict_keys(cfg.architecture):
        if key == "encoder.weight":
            out[key] = np.ascontiguousarray(np.asarray(params["encoder"]["kernel"]).T)
        elif key == "encoder.bias":
            out[key] = np.asarray(params["encoder"]["bias"])
        elif key in INT_BUFFERS:
            out[key] = np.asarray(buffers[key]).astype(np.int64)
        elif key in buffers:
            out[key] = np.asarray(buffers[key]).astype(np.float32)
        else:
            out[key] = np.asarray(params[key])
    return out


# Jitted conveniences: cfg and k are static (hashable), arrays are traced.
encode_jit = jax.jit(encode, static_argnums=(0, 4))
forward_jit = jax.jit(forward, static_argnums=(0, 4), static_argnames=("train",))
decode_jit = jax.jit(decode)

__all__ = [
    "FactorizerOutput",
    "FactorizerBatch",
    "LossTerms",
    "init_factorizer",
    "init_buffers",
    "normalize_rows",
    "normalize_decoder",
    "topk_sparse",
    "topk_mask",
    "scatter_rows",
    "pre_activation",
    "encode",
    "decode",
    "decode_sparse",
    "forward",
    "check_ready",
    "rectangle_step",
    "reconstruction_loss",
    "mse",
    "state_dict_keys",
    "expected_shapes",
    "state_dict_to_variables",
    "variables_to_state_dict",
    "encode_jit",
    "forward_jit",
    "decode_jit",
]
