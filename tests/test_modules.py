"""The flax.linen module wrappers (srp_jax.modules) against the pure kernels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srp_jax import factorizers as F
from srp_jax import modules as M
from srp_jax.config import ARCHITECTURES, FactorizerConfig
from srp_jax.dictionary import Dictionary, load_factorizer
from srp_jax.errors import ConfigError, ThresholdNotReadyError

d, D = 64, 256


def x_rows(seed: int = 0, n: int = 10) -> jax.Array:
    x = jax.random.normal(jax.random.key(seed), (n, d))
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def module_for(arch: str) -> M.SAEBase:
    return M.build_factorizer(
        {"factorizer": {"architecture": arch, "d_features": D, "k": 8, "encoder_init_scale": 0.05,
                        "log_threshold_init": -3.0, "bandwidth": 0.25, "threshold_momentum": 0.9}},
        d,
    )


def perturbed(variables: dict, seed: int) -> dict:
    """Non-trivial biases so every branch is exercised."""
    params = jax.tree.map(lambda a: a, variables["params"])
    params["encoder"]["kernel"] = params["encoder"]["kernel"] * 10.0
    params["encoder"]["bias"] = 0.05 * jax.random.normal(jax.random.key(seed), (D,))
    if "gate_bias" in params:
        params["gate_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (D,))
    return {**variables, "params": params}


def test_classes_are_linen_modules_with_reference_names():
    for cls in (M.SAEBase, M.TopKSAE, M.BatchTopKSAE, M.JumpReLUSAE, M.GatedSAE, M.L1ReLUSAE):
        assert issubclass(cls, nn.Module) and issubclass(cls, M.SAEBase)
    # reference positional order
    m = M.TopKSAE(d, D, 16, 0.1)
    assert (m.k, m.encoder_init_scale, m.architecture) == (16, 0.1, "topk")
    b = M.BatchTopKSAE(d, D, 16, 0.1, 0.9)
    assert (b.k, b.threshold_momentum) == (16, 0.9)
    j = M.JumpReLUSAE(d, D, 0.1, -5.0, 0.3)
    assert (j.log_threshold_init, j.bandwidth, j.k) == (-5.0, 0.3, D)
    assert M.GatedSAE(d, D).k == D and M.L1ReLUSAE(d, D).k == D


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_factorizer_maps_every_architecture(arch):
    m = module_for(arch)
    assert isinstance(m, M.MODULE_CLASSES[arch])
    assert m.architecture == arch
    cfg = m.factorizer_config
    assert cfg.architecture == arch and cfg.d_features == D and cfg.encoder_init_scale == 0.05
    if arch in ("topk", "matryoshka_topk", "batch_topk"):
        assert m.k == 8
    assert M.build_factorizer(cfg, d).factorizer_config == cfg


def test_build_factorizer_defaults_and_errors():
    m = M.build_factorizer({}, d)  # no factorizer block: reference defaults
    assert isinstance(m, M.TopKSAE) and m.d_features == 1024 and m.k == 32 and m.architecture == "topk"
    with pytest.raises(ValueError, match="architecture"):
        M.build_factorizer({"factorizer": {"architecture": "pca"}}, d)
    with pytest.raises(ConfigError, match="bogus"):
        M.build_factorizer({"factorizer": {"bogus": 1}}, d)
    assert M.build_factorizer({"factorizer": {"bogus": 1}}, d, strict=False).d_features == 1024
    with pytest.raises(ConfigError, match="cannot have architecture"):
        M.TopKSAE(d, D, 4, architecture="gated").factorizer_config
    mat = M.build_factorizer({"factorizer": {"architecture": "matryoshka_topk", "k_values": [2, 4], "matryoshka_weights": [2, 1]}}, d)
    assert mat.factorizer_config.loss_k_values() == ((2, 4), (2.0, 1.0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_layout_and_distributions(arch):
    m = module_for(arch)
    variables = m.init(jax.random.key(1), x_rows())
    params = variables["params"]
    ref_params, ref_buffers = F.init_factorizer(jax.random.key(1), m.factorizer_config, d)
    # exactly the pure layout: same tree structure, shapes and dtypes
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert set(variables) == ({"params", "buffers"} if ref_buffers else {"params"})
    if ref_buffers:
        assert jax.tree.structure(variables["buffers"]) == jax.tree.structure(ref_buffers)
        for key, value in ref_buffers.items():  # fresh buffers
            assert variables["buffers"][key].dtype == value.dtype
            assert np.asarray(variables["buffers"][key]) == np.asarray(value)
    # the reference distributions
    kernel = np.asarray(params["encoder"]["kernel"])
    assert abs(kernel.std() - 0.05) < 0.003 and abs(kernel.mean()) < 0.002
    assert not np.any(np.asarray(params["encoder"]["bias"]))
    dec = np.asarray(params["decoder"])
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, rtol=1e-5)
    # a normalized N(0, d^-1/2) matrix: entries ~ N(0, 1/d), no preferred direction
    assert abs(dec.std() * np.sqrt(d) - 1.0) < 0.03 and abs(dec.mean()) < 0.01
    if arch == "jumprelu":
        assert np.all(np.asarray(params["log_threshold"]) == np.float32(-3.0))
    if arch == "gated":
        assert not np.any(np.asarray(params["gate_bias"])) and not np.any(np.asarray(params["log_r"]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_apply_equals_pure_functions(arch):
    m = module_for(arch)
    variables = perturbed(m.init(jax.random.key(2), x_rows()), seed=2)
    params, buffers = variables["params"], variables.get("buffers", {})
    cfg = m.factorizer_config
    x = x_rows(3)
    if arch == "batch_topk":  # fit a threshold first (eval before fit raises, see below)
        _, upd = m.apply(variables, x, train=True, mutable=["buffers"])
        variables = {**variables, **upd}
        buffers = variables["buffers"]
    out = m.apply(variables, x)
    ref = F.forward(cfg, params, buffers, x)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    code = m.apply(variables, x, method=m.encode)
    np.testing.assert_array_equal(np.asarray(code), np.asarray(F.encode(cfg, params, buffers, x)))
    assert 0 < int(np.sum(np.asarray(code) > 0)) < code.size or arch == "l1_relu"
    np.testing.assert_array_equal(
        np.asarray(m.apply(variables, code, method=m.decode)), np.asarray(F.decode(params, code))
    )
    if arch in ("topk", "matryoshka_topk"):
        code3 = m.apply(variables, x, 3, method=m.encode)
        assert np.all(np.sum(np.asarray(code3) > 0, axis=1) == 3)
    terms = m.apply(variables, x, method=m.reconstruction_loss, mutable=["buffers"])[0]
    ref_terms = F.reconstruction_loss(cfg, params, buffers, x)
    assert float(terms.rec) == float(ref_terms.rec)
    # jit through apply
    jitted = jax.jit(lambda v, x: m.apply(v, x).code)(variables, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(out.code), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["batch_topk", "jumprelu"])
def test_buffer_updates_through_mutable_collection(arch):
    m = module_for(arch)
    variables = perturbed(m.init(jax.random.key(4), x_rows()), seed=4)
    cfg = m.factorizer_config
    buffers = variables["buffers"]
    for i in range(3):
        x = x_rows(10 + i)
        out, upd = m.apply(variables, x, train=True, mutable=["buffers"])
        ref = F.forward(cfg, variables["params"], buffers, x, train=True)
        buffers = ref.buffers
        for key in buffers:
            np.testing.assert_array_equal(np.asarray(upd["buffers"][key]), np.asarray(buffers[key]))
            np.testing.assert_array_equal(np.asarray(out.buffers[key]), np.asarray(buffers[key]))
        np.testing.assert_array_equal(np.asarray(out.code), np.asarray(ref.code))
        variables = {**variables, **upd}
    flag = "threshold_initialized" if arch == "batch_topk" else "act_scale_init"
    assert int(variables["buffers"][flag]) == 1
    # train=True without a mutable collection: the output is computed, stored buffers untouched
    out = m.apply(variables, x_rows(20), train=True)
    assert out.code.shape == (10, D)
    # init never fits the buffers, even with train=True
    fresh = m.init(jax.random.key(5), x_rows(), train=True)["buffers"]
    assert int(fresh[flag]) == 0


def test_batch_topk_module_eval_before_fit_raises():
    m = module_for("batch_topk")
    variables = m.init(jax.random.key(6), x_rows())  # init itself must not raise
    with pytest.raises(ThresholdNotReadyError, match="threshold"):
        m.apply(variables, x_rows())
    with pytest.raises(RuntimeError, match="threshold"):
        m.apply(variables, x_rows(), method=m.encode)


@pytest.mark.parametrize("arch", ["topk", "batch_topk", "jumprelu", "gated"])
def test_loaded_dictionary_applies_through_module(arch):
    m = module_for(arch)
    variables = perturbed(m.init(jax.random.key(7), x_rows()), seed=7)
    if arch == "batch_topk":
        variables = {**variables, **m.apply(variables, x_rows(1), train=True, mutable=["buffers"])[1]}
    cfg = m.factorizer_config
    state = F.variables_to_state_dict(variables["params"], variables.get("buffers", {}), cfg)
    dictionary = load_factorizer({"model_state_dict": state, "factorizer": cfg.to_dict()})
    assert isinstance(dictionary, Dictionary)
    module = M.module_from_dictionary(dictionary)
    assert type(module) is type(m) and module.factorizer_config == cfg
    x = x_rows(8)
    code = module.apply({"params": dictionary.params, "buffers": dictionary.buffers}, x).code
    np.testing.assert_allclose(np.asarray(code), np.asarray(dictionary.encode(x)), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(code > 0), np.asarray(dictionary.encode(x) > 0))
    bound = M.bind_dictionary(dictionary)
    np.testing.assert_array_equal(np.asarray(bound.encode(x)), np.asarray(module.apply(M.dictionary_variables(dictionary), x, method=module.encode)))
    assert bound.decode(code).shape == (10, d)


def test_bound_module_updates_buffers_when_mutable():
    m = module_for("jumprelu")
    variables = m.init(jax.random.key(9), x_rows())
    cfg = FactorizerConfig.from_dict(m.factorizer_config.to_dict())
    dictionary = Dictionary(config=cfg, params=variables["params"], buffers=variables["buffers"], d_model=d)
    bound = M.bind_dictionary(dictionary, mutable=["buffers"])
    bound(x_rows(1), train=True)
    assert int(bound.variables["buffers"]["act_scale_init"]) == 1
    assert int(dictionary.buffers["act_scale_init"]) == 0  # the Dictionary itself is untouched
