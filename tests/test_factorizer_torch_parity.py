"""Parity of the JAX factorizers with an independent torch implementation (tests/_torch_reference.py).

The same random parameters (small shapes: d=32, D=96, B=16) are loaded into both; codes,
reconstructions, auxiliary terms, buffer updates and the gradients of the full training loss
must agree to float32 round-off. Also: k fallbacks, strict ``>`` comparisons on exactly-equal
values, the BatchTopK not-fitted error, and state-dict loading (round trips, every loader
variant, strict key/shape errors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from srp_jax import factorizers as F
from srp_jax.config import ARCHITECTURES, K_ARCHITECTURES, FactorizerConfig
from srp_jax.dictionary import Dictionary, load_factorizer
from srp_jax.errors import (
    MissingConfigError,
    MissingKeyError,
    ShapeError,
    SrpError,
    ThresholdNotReadyError,
    UnexpectedKeyError,
)

from _torch_reference import TorchFactorizer

D_MODEL, D_FEAT, BATCH, K = 32, 96, 16, 8
TOL = 1e-5  # max |jax - torch| / max |torch|


# --------------------------------------------------------------------------------------------
# helpers


def make_cfg(arch: str, **overrides) -> FactorizerConfig:
    kw = {"architecture": arch, "d_features": D_FEAT}
    if arch in K_ARCHITECTURES:
        kw["k"] = K
    if arch == "jumprelu":
        kw["bandwidth"] = 0.5
    kw.update(overrides)
    return FactorizerConfig(**kw)


def make_state(arch: str, seed: int = 0, *, fitted: bool = False) -> dict[str, np.ndarray]:
    """Random reference-layout state dict; biases and thresholds chosen so every branch is hit."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    state = {
        "encoder.weight": (0.5 * rng.standard_normal((D_FEAT, D_MODEL))).astype(f32),
        "encoder.bias": (0.1 * rng.standard_normal(D_FEAT)).astype(f32),
        # deliberately NOT unit rows: exposes any hidden renormalisation / norm detaching
        "decoder": (rng.standard_normal((D_FEAT, D_MODEL)) * rng.uniform(0.5, 2.0, (D_FEAT, 1))).astype(f32),
    }
    if arch == "jumprelu":
        state["log_threshold"] = np.log(rng.uniform(0.05, 0.6, D_FEAT)).astype(f32)
        state["act_scale_ema"] = np.array(0.4 if fitted else 1.0, f32)
        state["act_scale_init"] = np.array(1 if fitted else 0, np.int64)
    if arch == "batch_topk":
        state["activation_threshold"] = np.array(0.3 if fitted else 0.0, f32)
        state["threshold_initialized"] = np.array(1 if fitted else 0, np.int64)
    if arch == "gated":
        state["gate_bias"] = (0.2 * rng.standard_normal(D_FEAT)).astype(f32)
        state["log_r"] = (0.3 * rng.standard_normal(D_FEAT)).astype(f32)
    return state


def make_x(seed: int, batch: int = BATCH) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    x = rng.standard_normal((batch, D_MODEL))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def both(arch: str, seed: int = 0, *, fitted: bool = False, training: bool = False, **cfg_overrides):
    cfg = make_cfg(arch, **cfg_overrides)
    state = make_state(arch, seed, fitted=fitted)
    params, buffers = F.state_dict_to_variables(state, cfg, D_MODEL)
    ref = TorchFactorizer(
        arch, state, k=cfg.native_k, momentum=cfg.threshold_momentum, bandwidth=cfg.bandwidth, training=training
    )
    return cfg, params, buffers, ref


def rel_err(jax_value, torch_value) -> float:
    a = np.asarray(jax_value, np.float64)
    b = torch_value.detach().numpy().astype(np.float64) if isinstance(torch_value, torch.Tensor) else np.asarray(
        torch_value, np.float64
    )
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def assert_same_code(jax_code, torch_code) -> None:
    j = np.asarray(jax_code)
    t = torch_code.detach().numpy()
    np.testing.assert_array_equal(j > 0, t > 0, err_msg="supports differ")
    assert rel_err(j, t) <= TOL


def assert_outputs_match(out: F.FactorizerOutput, ref_out: dict) -> None:
    assert_same_code(out.code, ref_out["code"])
    assert rel_err(out.reconstruction, ref_out["reconstruction"]) <= TOL
    assert rel_err(out.aux_loss, ref_out["aux_loss"]) <= TOL
    if ref_out["aux_recon"] is None:
        assert out.aux_recon is None
    else:
        assert rel_err(out.aux_recon, ref_out["aux_recon"]) <= TOL
    assert float(out.mean_l0) == pytest.approx(ref_out["mean_l0"], rel=1e-6)


def assert_buffers_match(buffers: F.Buffers, ref: TorchFactorizer) -> None:
    assert set(buffers) == set(ref.buffers)
    for key, value in ref.buffers.items():
        if value.dtype == torch.int64:
            assert int(buffers[key]) == int(value), key
        else:
            assert float(buffers[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), key


# --------------------------------------------------------------------------------------------
# forward / encode parity


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eval_forward_and_encode_match_torch(arch):
    cfg, params, buffers, ref = both(arch, seed=1, fitted=True)
    x = make_x(1)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        ref_out = ref.forward(xt)
        ref_code = ref.encode(xt)
    out = F.forward_jit(cfg, params, buffers, jnp.asarray(x), None, train=False)
    assert_outputs_match(out, ref_out)
    assert_same_code(F.encode_jit(cfg, params, buffers, jnp.asarray(x), None), ref_code)
    # the code is sparse-ish and non-trivial for every architecture (the test can fail)
    n_active = int(np.sum(np.asarray(out.code) > 0))
    assert 0 < n_active < BATCH * D_FEAT or arch == "l1_relu"
    if arch in ("topk", "matryoshka_topk"):
        assert n_active == BATCH * K
    # eval mode leaves buffers alone (in both implementations)
    for key in buffers:
        assert np.array_equal(np.asarray(out.buffers[key]), np.asarray(buffers[key]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_forward_and_buffer_updates_match_torch(arch):
    """Several training-mode calls from fresh buffers: outputs and buffers agree after each."""
    cfg, params, buffers, ref = both(arch, seed=2, fitted=False, training=True)
    step = jax.jit(lambda p, b, x: F.forward(cfg, p, b, x, None, train=True))
    history = []
    for i in range(4):
        x = make_x(10 + i)
        with torch.no_grad():
            ref_out = ref.forward(torch.from_numpy(x))
        out = step(params, buffers, jnp.asarray(x))
        assert_outputs_match(out, ref_out)
        buffers = out.buffers
        assert_buffers_match(buffers, ref)
        history.append({k: float(v) for k, v in buffers.items()})
    if arch == "batch_topk":
        assert [h["threshold_initialized"] for h in history] == [1, 1, 1, 1]
        # first call copies the cutoff; later calls move it by (1 - 0.995) only
        assert history[0]["activation_threshold"] > 0
        assert history[1]["activation_threshold"] != history[0]["activation_threshold"]
        nnz = int(np.sum(np.asarray(out.code) > 0))
        assert nnz == BATCH * K  # min(B*k, #positive)
    if arch == "jumprelu":
        assert [h["act_scale_init"] for h in history] == [1, 1, 1, 1]
        assert history[0]["act_scale_ema"] != 1.0


@pytest.mark.parametrize("arch", ["batch_topk", "jumprelu"])
def test_ema_recurrences_by_hand(arch):
    """The buffer recurrences against a hand computation (independent of torch)."""
    cfg, params, buffers, _ = both(arch, seed=3)
    xs = [jnp.asarray(make_x(20 + i)) for i in range(3)]
    expected = None
    for x in xs:
        acts = np.asarray(jax.nn.relu(F.pre_activation(params, x)), np.float64)
        if arch == "batch_topk":
            stat = np.sort(acts.ravel())[::-1][BATCH * K - 1]
            m = 0.995
        else:
            pos = acts[acts > 0]
            stat = np.sqrt(np.mean(pos**2))
            m = 0.99
        expected = stat if expected is None else m * expected + (1 - m) * stat
        buffers = F.forward(cfg, params, buffers, x, None, train=True).buffers
        key = "activation_threshold" if arch == "batch_topk" else "act_scale_ema"
        assert float(buffers[key]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# gradients of the full training loss


AUX_COEFF, AUX_MSE_COEFF = 0.7, 1.3


def _torch_grads(ref: TorchFactorizer, x: np.ndarray, cfg: FactorizerConfig, k=None):
    ref.zero_grad()
    rec, code, aux, aux_mse = ref.reconstruction_loss(
        torch.from_numpy(x), k, k_values=list(cfg.k_values), weights=list(cfg.matryoshka_weights)
    )
    loss = rec + AUX_COEFF * aux + AUX_MSE_COEFF * aux_mse
    loss.backward()
    grads = {key: (p.grad if p.grad is not None else torch.zeros_like(p)) for key, p in ref.params.items()}
    return float(loss.detach()), code, grads


def _jax_grads(cfg, params, buffers, x, k=None):
    def loss_fn(p):
        t = F.reconstruction_loss(cfg, p, buffers, x, k, train=True)
        return t.rec + AUX_COEFF * t.aux + AUX_MSE_COEFF * t.aux_recon_mse, t

    (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return float(loss), terms, grads


def _flat_jax_grads(grads) -> dict[str, np.ndarray]:
    out = {"encoder.weight": np.asarray(grads["encoder"]["kernel"]).T, "encoder.bias": np.asarray(grads["encoder"]["bias"])}
    out.update({key: np.asarray(v) for key, v in grads.items() if key != "encoder"})
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_gradients_match_torch(arch):
    """d(rec + c1*aux + c2*aux_recon_mse)/d(every parameter), training mode.

    Covers the BatchTopK kept-entry gradient, the JumpReLU rectangle STE with RMS-scaled
    bandwidth (log_threshold only learns through it), the gated stop-gradient decoder on the
    aux reconstruction and the l1_relu aux with detached decoder norms.
    """
    cfg, params, buffers, ref = both(arch, seed=4, fitted=True, training=True)
    x = make_x(4)
    t_loss, t_code, t_grads = _torch_grads(ref, x, cfg)
    j_loss, terms, j_grads = _jax_grads(cfg, params, buffers, jnp.asarray(x))
    assert j_loss == pytest.approx(t_loss, rel=1e-5)
    assert_same_code(terms.code, t_code)
    flat = _flat_jax_grads(j_grads)
    assert set(flat) == set(t_grads)
    for key, tg in t_grads.items():
        assert float(tg.abs().max()) > 0, f"{arch}: torch gradient of {key} is zero; the check would be vacuous"
        assert rel_err(flat[key], tg) <= 2 * TOL, f"{arch}: gradient of {key}: rel err {rel_err(flat[key], tg):.2e}"
    if arch in BUFFERED:
        assert_buffers_match(terms.buffers, ref)


BUFFERED = ("batch_topk", "jumprelu")


def test_jumprelu_ste_is_rectangle_of_rms_scaled_width():
    """d(aux)/d(log_threshold) by hand: -theta * sum_b 1[|z-theta| <= h/2] / h / B with
    h = bandwidth * EMA(rms) after this call's update (fresh buffers: the batch RMS)."""
    cfg, params, buffers, _ = both("jumprelu", seed=5, fitted=False)
    x = jnp.asarray(make_x(5))
    z = np.asarray(jax.nn.relu(F.pre_activation(params, x)), np.float64)
    theta = np.exp(np.asarray(params["log_threshold"], np.float64))
    h = cfg.bandwidth * np.sqrt(np.mean(z[z > 0] ** 2))
    window = (np.abs(z - theta) <= h / 2).astype(np.float64)
    assert 0 < window.sum() < window.size
    expected = -theta * window.sum(0) / h / z.shape[0]

    grad = jax.grad(lambda p: F.forward(cfg, p, buffers, x, None, train=True).aux_loss)(params)
    np.testing.assert_allclose(np.asarray(grad["log_threshold"]), expected, rtol=1e-4, atol=1e-6)


def test_matryoshka_weighted_loss_matches_torch_and_hand_formula():
    cfg, params, buffers, ref = both(
        "matryoshka_topk", seed=6, training=True, k_values=(2, 4, 8), matryoshka_weights=(3.0, 2.0, 1.0)
    )
    x = make_x(6)
    xj = jnp.asarray(x)
    terms = F.reconstruction_loss(cfg, params, buffers, xj)
    by_hand = sum(
        w * float(F.mse(F.forward(cfg, params, buffers, xj, kk).reconstruction, xj)) for kk, w in ((2, 3), (4, 2), (8, 1))
    ) / 6.0
    assert float(terms.rec) == pytest.approx(by_hand, rel=1e-6)
    # the code returned is the last k's (8 nonzeros per row), aux is 0
    assert np.all(np.sum(np.asarray(terms.code) > 0, axis=1) == 8)
    assert float(terms.aux) == 0.0
    # unweighted mean would differ: the test can tell the weights apart
    unweighted = np.mean([float(F.mse(F.forward(cfg, params, buffers, xj, kk).reconstruction, xj)) for kk in (2, 4, 8)])
    assert abs(unweighted - by_hand) > 1e-6 * by_hand

    t_loss, t_code, t_grads = _torch_grads(ref, x, cfg)
    j_loss, j_terms, j_grads = _jax_grads(cfg, params, buffers, xj)
    assert j_loss == pytest.approx(t_loss, rel=1e-5)
    assert_same_code(j_terms.code, t_code)
    flat = _flat_jax_grads(j_grads)
    for key, tg in t_grads.items():
        assert rel_err(flat[key], tg) <= 2 * TOL, key


def test_matryoshka_mismatched_weights_mean_all_ones():
    cfg = make_cfg("matryoshka_topk", k_values=(2, 4, 8), matryoshka_weights=(3.0, 2.0))
    assert cfg.loss_k_values() == ((2, 4, 8), (1.0, 1.0, 1.0))
    params, buffers = F.state_dict_to_variables(make_state("matryoshka_topk", 7), cfg, D_MODEL)
    xj = jnp.asarray(make_x(7))
    mean = np.mean([float(F.mse(F.forward(cfg, params, buffers, xj, kk).reconstruction, xj)) for kk in (2, 4, 8)])
    assert float(F.reconstruction_loss(cfg, params, buffers, xj).rec) == pytest.approx(mean, rel=1e-6)


# --------------------------------------------------------------------------------------------
# k fallback and passthrough


@pytest.mark.parametrize("arch", ["topk", "matryoshka_topk", "batch_topk"])
@pytest.mark.parametrize("k", [None, 0, 3, D_FEAT, D_FEAT + 5])
def test_k_rules_match_torch(arch, k):
    training = arch == "batch_topk"
    cfg, params, buffers, ref = both(arch, seed=8, training=training)
    x = make_x(8)
    with torch.no_grad():
        ref_out = ref.forward(torch.from_numpy(x), k)
    out = F.forward(cfg, params, buffers, jnp.asarray(x), k, train=training)
    assert_outputs_match(out, ref_out)
    acts = np.asarray(jax.nn.relu(F.pre_activation(params, jnp.asarray(x))))
    code = np.asarray(out.code)
    k_eff = K if not k else k
    if k_eff >= D_FEAT:
        np.testing.assert_array_equal(code, acts)  # dense ReLU passthrough
    elif arch == "batch_topk":
        assert int(np.sum(code > 0)) == BATCH * k_eff
    else:
        assert np.all(np.sum(code > 0, axis=1) == k_eff)


@pytest.mark.parametrize("arch", ["jumprelu", "gated", "l1_relu"])
def test_k_is_ignored_where_meaningless(arch):
    cfg, params, buffers, _ = both(arch, seed=9, fitted=True)
    x = jnp.asarray(make_x(9))
    base = np.asarray(F.encode(cfg, params, buffers, x))
    for k in (1, 5, D_FEAT + 1):
        np.testing.assert_array_equal(np.asarray(F.encode(cfg, params, buffers, x, k)), base)
    assert cfg.native_k == D_FEAT


# --------------------------------------------------------------------------------------------
# strict ">" comparisons on exactly equal values (constructed exactly: zero weight rows)


def _exact_rows(state: dict, values: dict[int, float]) -> None:
    """Feature j gets a zero weight row and bias values[j], so its pre-activation is exactly that."""
    for j, value in values.items():
        state["encoder.weight"][j] = 0.0
        state["encoder.bias"][j] = np.float32(value)


def _load(arch, state, **cfg_overrides):
    cfg = make_cfg(arch, **cfg_overrides)
    params, buffers = F.state_dict_to_variables(state, cfg, D_MODEL)
    ref = TorchFactorizer(arch, state, k=cfg.native_k, bandwidth=cfg.bandwidth)
    return cfg, params, buffers, ref


def test_batch_topk_eval_is_strictly_greater_than_threshold():
    state = make_state("batch_topk", 10, fitted=True)
    thr = np.float32(0.5)
    above = np.nextafter(thr, np.float32(1))
    _exact_rows(state, {0: thr, 1: above})
    state["activation_threshold"] = np.array(thr)
    cfg, params, buffers, ref = _load("batch_topk", state)
    x = make_x(10)
    code = np.asarray(F.encode(cfg, params, buffers, jnp.asarray(x)))
    assert np.all(code[:, 0] == 0) and np.all(code[:, 1] == above)
    acts = np.asarray(jax.nn.relu(F.pre_activation(params, jnp.asarray(x))))
    np.testing.assert_array_equal(code, np.where(acts > thr, acts, 0))
    with torch.no_grad():
        assert_same_code(code, ref.encode(torch.from_numpy(x)))


def test_jumprelu_is_strictly_greater_than_theta():
    state = make_state("jumprelu", 11, fitted=True)
    state["log_threshold"][:2] = 0.0  # theta = exp(0) = 1 exactly
    _exact_rows(state, {0: 1.0, 1: np.nextafter(np.float32(1), np.float32(2))})
    cfg, params, buffers, ref = _load("jumprelu", state)
    x = make_x(11)
    for train in (False, True):
        code = np.asarray(F.forward(cfg, params, buffers, jnp.asarray(x), train=train).code)
        assert np.all(code[:, 0] == 0) and np.all(code[:, 1] > 1)
    with torch.no_grad():
        assert_same_code(F.encode(cfg, params, buffers, jnp.asarray(x)), ref.encode(torch.from_numpy(x)))


def test_gated_gate_is_strictly_positive():
    state = make_state("gated", 12)
    _exact_rows(state, {0: 0.7, 1: 0.7})  # z = 0 exactly, magnitude 0.7
    state["log_r"][:2] = 0.0
    state["gate_bias"][0] = 0.0  # pre-gate exactly 0: closed
    state["gate_bias"][1] = np.float32(1e-30)  # pre-gate barely positive: open
    cfg, params, buffers, ref = _load("gated", state)
    x = make_x(12)
    out = F.forward(cfg, params, buffers, jnp.asarray(x))
    code = np.asarray(out.code)
    assert np.all(code[:, 0] == 0)
    np.testing.assert_allclose(code[:, 1], np.float32(0.7))
    with torch.no_grad():
        assert_outputs_match(out, ref.forward(torch.from_numpy(x)))


# --------------------------------------------------------------------------------------------
# BatchTopK threshold readiness through Dictionary


def _dictionary(arch, seed, *, fitted=False) -> Dictionary:
    cfg = make_cfg(arch)
    return load_factorizer({"model_state_dict": make_state(arch, seed, fitted=fitted), "factorizer": cfg.to_dict()})


def test_batch_topk_eval_before_fit_raises():
    d = _dictionary("batch_topk", 13)
    x = make_x(13)
    for call in (d.encode, d.forward):
        with pytest.raises(ThresholdNotReadyError) as info:
            call(x)
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, SrpError)
        assert "threshold" in str(info.value)
    # the torch reading of the spec raises too
    ref = TorchFactorizer("batch_topk", make_state("batch_topk", 13), k=K)
    with pytest.raises(RuntimeError, match="threshold"):
        ref.encode(torch.from_numpy(x))


def test_batch_topk_training_encode_then_strict_eval():
    d = _dictionary("batch_topk", 14)
    ref = TorchFactorizer("batch_topk", make_state("batch_topk", 14), k=K, training=True)
    x = make_x(14)
    code = d.train().encode(x)
    with torch.no_grad():
        assert_same_code(code, ref.encode(torch.from_numpy(x)))
    assert int(d.buffers["threshold_initialized"]) == 1
    thr = float(d.buffers["activation_threshold"])
    assert thr == pytest.approx(float(ref.buffers["activation_threshold"]), rel=1e-6)
    # eval: acts > thr, strictly; the batch's own cutoff entry is therefore dropped
    x2 = make_x(15)
    eval_code = np.asarray(d.eval().encode(x2))
    acts = np.asarray(jax.nn.relu(F.pre_activation(d.params, jnp.asarray(x2))))
    np.testing.assert_array_equal(eval_code, np.where(acts > np.float32(thr), acts, 0))
    own = np.asarray(d.encode(x))
    assert int(np.sum(own > 0)) == BATCH * K - 1  # the minimum selected entry equals thr
    ref.training = False
    with torch.no_grad():
        assert_same_code(eval_code, ref.encode(torch.from_numpy(x2)))


# --------------------------------------------------------------------------------------------
# state dicts and loaders


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_state_dict_round_trip_is_exact(arch):
    cfg = make_cfg(arch)
    state = make_state(arch, 16, fitted=True)
    params, buffers = F.state_dict_to_variables(state, cfg, D_MODEL)
    assert params["encoder"]["kernel"].shape == (D_MODEL, D_FEAT)
    np.testing.assert_array_equal(np.asarray(params["encoder"]["kernel"]), state["encoder.weight"].T)
    back = F.variables_to_state_dict(params, buffers, cfg)
    assert list(back) == list(F.state_dict_keys(arch))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # torch tensors are accepted as the state and give the same pytrees
    torch_state = {key: torch.from_numpy(np.array(v)) for key, v in state.items()}
    p2, b2 = F.state_dict_to_variables(torch_state, cfg, D_MODEL)
    for a, b in zip(jax.tree.leaves((params, buffers)), jax.tree.leaves((p2, b2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the torch reading of the spec reproduces the same numbers from that state
    ref = TorchFactorizer(arch, state, k=cfg.native_k)
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.parametrize("arch", ["topk", "batch_topk", "jumprelu", "gated"])
def test_load_factorizer_variants(arch):
    cfg = make_cfg(arch)
    state = make_state(arch, 17, fitted=True)
    block = cfg.to_dict()
    x = make_x(17)
    variants = {
        "model_state_dict+config.factorizer": (
            {"model_state_dict": state, "config": {"factorizer": block}, "row_mean": np.zeros(D_MODEL, np.float32)},
            {},
        ),
        "state_dict+factorizer": ({"state_dict": state, "factorizer": block}, {}),
        "bare+external config": (dict(state), {"factorizer_config": block}),
        "bare+FactorizerConfig": (dict(state), {"factorizer_config": cfg}),
        "explicit d_model": ({"model_state_dict": state, "factorizer": block}, {"d_model": D_MODEL}),
        "empty factorizer falls through": (
            {"model_state_dict": state, "factorizer": {}, "config": {"factorizer": block}},
            {},
        ),
    }
    expected = F.encode_jit(cfg, *F.state_dict_to_variables(state, cfg, D_MODEL), jnp.asarray(x), None)
    for name, (ckpt, kwargs) in variants.items():
        d = load_factorizer(ckpt, **kwargs)
        assert d.architecture == arch and d.d_model == D_MODEL and d.d_features == D_FEAT, name
        assert d.k == cfg.native_k, name
        assert not d.training, name
        np.testing.assert_array_equal(np.asarray(d.encode(x)), np.asarray(expected), err_msg=name)
    d = load_factorizer({"model_state_dict": state, "config": {"factorizer": block}})
    assert d.source_config == {"factorizer": block}
    assert load_factorizer({"state_dict": state, "factorizer": block}, eval_mode=False).training


def test_load_factorizer_missing_config_is_key_error():
    state = make_state("topk", 18)
    for ckpt in ({"model_state_dict": state}, dict(state), {"model_state_dict": state, "factorizer": {}}):
        with pytest.raises(KeyError) as info:
            load_factorizer(ckpt)
        assert isinstance(info.value, MissingConfigError)
        assert "factorizer" in str(info.value)


@pytest.mark.parametrize("arch", ["topk", "batch_topk", "jumprelu", "gated"])
def test_load_factorizer_strict_keys_and_shapes(arch):
    block = make_cfg(arch).to_dict()
    state = make_state(arch, 19, fitted=True)
    removable = [key for key in state if key != "encoder.weight"]
    for key in removable:
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(MissingKeyError) as info:
            load_factorizer({"model_state_dict": broken, "factorizer": block})
        # KeyError (ours) and RuntimeError (torch's strict load_state_dict) both catch it
        assert isinstance(info.value, KeyError) and isinstance(info.value, RuntimeError) and key in str(info.value)
    with pytest.raises(RuntimeError, match=r"extra\.weight") as info:
        load_factorizer({"model_state_dict": {**state, "extra.weight": np.zeros(3, np.float32)}, "factorizer": block})
    assert isinstance(info.value, UnexpectedKeyError)
    # a buffer of another architecture is unexpected too
    foreign = "act_scale_ema" if arch != "jumprelu" else "activation_threshold"
    with pytest.raises(UnexpectedKeyError, match=foreign):
        load_factorizer({"model_state_dict": {**state, foreign: np.zeros((), np.float32)}, "factorizer": block})
    bad = {**state, "decoder": np.zeros((D_FEAT, D_MODEL + 1), np.float32)}
    with pytest.raises(ShapeError, match="decoder") as info:
        load_factorizer({"model_state_dict": bad, "factorizer": block})
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert str((D_FEAT, D_MODEL + 1)) in str(info.value)
    # an explicit d_model / d_features that disagrees with the weights: the first key checked is named
    with pytest.raises(ShapeError, match=rf"'decoder' has shape \({D_FEAT}, {D_MODEL}\).*d_model={D_MODEL + 1}"):
        load_factorizer({"model_state_dict": state, "factorizer": block}, d_model=D_MODEL + 1)
    wrong_d = {**block, "d_features": D_FEAT + 1}
    with pytest.raises(ShapeError, match=rf"has shape \({D_FEAT}, {D_MODEL}\).*d_features={D_FEAT + 1}"):
        load_factorizer({"model_state_dict": state, "factorizer": wrong_d})
    no_weight = {k: v for k, v in state.items() if k != "encoder.weight"}
    with pytest.raises(ValueError, match=r"encoder\.weight"):
        load_factorizer({"model_state_dict": no_weight, "factorizer": block})
    with pytest.raises(MissingKeyError, match=r"encoder\.weight"):
        load_factorizer({"model_state_dict": no_weight, "factorizer": block}, d_model=D_MODEL)
