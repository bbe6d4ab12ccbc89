"""Properties of the pure factorizer kernels (srp_jax.factorizers) and Dictionary input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srp_jax import factorizers as F
from srp_jax.config import ARCHITECTURES, K_ARCHITECTURES, FactorizerConfig
from srp_jax.dictionary import Dictionary
from srp_jax.errors import NonFiniteError, ShapeError, SrpError

d, D, B, K = 16, 40, 12, 5


def cfg_for(arch: str, **kw) -> FactorizerConfig:
    base = {"architecture": arch, "d_features": D}
    if arch in K_ARCHITECTURES:
        base["k"] = K
    base.update(kw)
    return FactorizerConfig(**base)


def random_variables(arch: str, seed: int = 0):
    """init_factorizer plus non-trivial biases/thresholds, fitted BatchTopK buffers."""
    cfg = cfg_for(arch)
    key = jax.random.key(seed)
    params, buffers = F.init_factorizer(key, cfg, d)
    k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, 7), 4)
    params["encoder"]["kernel"] = 0.5 * jax.random.normal(k1, (d, D))
    params["encoder"]["bias"] = 0.1 * jax.random.normal(k2, (D,))
    if arch == "jumprelu":
        params["log_threshold"] = jnp.log(jax.random.uniform(k3, (D,), minval=0.05, maxval=0.5))
    if arch == "gated":
        params["gate_bias"] = 0.2 * jax.random.normal(k3, (D,))
        params["log_r"] = 0.3 * jax.random.normal(k4, (D,))
    if arch == "batch_topk":
        buffers = {"activation_threshold": jnp.float32(0.4), "threshold_initialized": jnp.int32(1)}
    return cfg, params, buffers


def rows(seed: int, n: int = B) -> jax.Array:
    x = jax.random.normal(jax.random.key(100 + seed), (n, d))
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# top-k kernels


def test_topk_ties_keep_the_lower_index():
    acts = jnp.asarray([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]], jnp.float32)
    code = np.asarray(F.topk_mask(acts, 3))
    np.testing.assert_array_equal(code[0], [0, 3, 2, 2, 0, 0])
    np.testing.assert_array_equal(code[1], [2, 2, 2, 0, 0, 0])
    _, idx = F.topk_sparse(acts, 3)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2, 3], [0, 1, 2]])


def test_topk_ties_through_encode():
    """Exactly equal activations (zero weight rows, equal biases): the lower feature ids win."""
    cfg, params, buffers = random_variables("topk")
    tied = jnp.asarray([3, 7, 11, 20, 33])
    params["encoder"]["kernel"] = params["encoder"]["kernel"].at[:, tied].set(0.0)
    params["encoder"]["bias"] = jnp.full((D,), -5.0).at[tied].set(0.25)  # only the tied features are positive
    code = np.asarray(F.encode(cfg, params, buffers, rows(0), 3))
    assert np.all((code > 0) == np.isin(np.arange(D), [3, 7, 11])[None, :])
    assert np.all(code[:, [3, 7, 11]] == np.float32(0.25))


def _numpy_topk(acts: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-acts, axis=-1, kind="stable")[..., :k]
    out = np.zeros_like(acts)
    np.put_along_axis(out, order, np.take_along_axis(acts, order, -1), -1)
    return out


@pytest.mark.parametrize("k", [1, 4, D - 1, D, D + 3])
def test_topk_mask_is_scatter_of_topk_sparse(k):
    acts = jax.nn.relu(jax.random.normal(jax.random.key(k), (3, 4, D)))  # extra leading axis
    mask = np.asarray(F.topk_mask(acts, k))
    np.testing.assert_array_equal(mask, _numpy_topk(np.asarray(acts), min(k, D)))
    if k < D:
        vals, idx = F.topk_sparse(acts, k)
        np.testing.assert_array_equal(mask, np.asarray(F.scatter_rows(vals, idx, D)))
    else:
        np.testing.assert_array_equal(mask, np.asarray(acts))  # passthrough
    assert np.all(np.sum(mask != 0, axis=-1) <= k)


def test_topk_mask_nonpositive_k_is_all_zero():
    acts = jnp.ones((2, D))
    assert not np.any(np.asarray(F.topk_mask(acts, 0)))


def test_nonzeros_at_most_k_when_few_activations_are_positive():
    cfg, params, buffers = random_variables("topk")
    params["encoder"]["bias"] = jnp.full((D,), -0.9)  # most pre-activations negative
    x = rows(1)
    pre = np.asarray(F.pre_activation(params, x))
    n_pos = np.sum(pre > 0, axis=1)
    assert np.any(n_pos < K) and np.any(n_pos > 0)
    code = np.asarray(F.encode(cfg, params, buffers, x))
    np.testing.assert_array_equal(np.sum(code > 0, axis=1), np.minimum(n_pos, K))
    assert np.all(code >= 0)


def test_decode_sparse_equals_dense_decode():
    cfg, params, buffers = random_variables("topk")
    acts = jax.nn.relu(F.pre_activation(params, rows(2)))
    vals, idx = F.topk_sparse(acts, K)
    dense = F.scatter_rows(vals, idx, D)
    np.testing.assert_allclose(
        np.asarray(F.decode_sparse(params, vals, idx)), np.asarray(F.decode(params, dense)), rtol=1e-6, atol=1e-6
    )
    by_hand = np.asarray(dense, np.float64) @ np.asarray(params["decoder"], np.float64)
    np.testing.assert_allclose(np.asarray(F.decode(params, dense)), by_hand, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# jit / vmap


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_jit_and_vmap_agree_with_eager(arch):
    cfg, params, buffers = random_variables(arch, seed=3)
    x = rows(3)
    eager = np.asarray(F.encode(cfg, params, buffers, x))
    jitted = np.asarray(F.encode_jit(cfg, params, buffers, x, None))
    np.testing.assert_array_equal(eager > 0, jitted > 0)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    per_row = jax.vmap(lambda r: F.encode(cfg, params, buffers, r[None])[0])(x)
    np.testing.assert_allclose(np.asarray(per_row), eager, rtol=1e-6, atol=1e-7)
    out = F.forward_jit(cfg, params, buffers, x, None, train=False)
    np.testing.assert_allclose(np.asarray(out.code), eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(out.reconstruction), np.asarray(F.decode(params, jnp.asarray(eager))), rtol=1e-5, atol=1e-6
    )
    # vmap over a stack of parameter sets (e.g. an ensemble) matches a Python loop
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2.0 * a]), params)
    codes = jax.vmap(lambda p: F.encode(cfg, p, buffers, x))(stacked)
    for i, scale in enumerate((1.0, 2.0)):
        p_i = jax.tree.map(lambda a: scale * a, params)
        np.testing.assert_allclose(np.asarray(codes[i]), np.asarray(F.encode(cfg, p_i, buffers, x)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# decoder normalisation and init


def test_normalize_decoder_unit_rows_and_zero_row_clamp():
    dec = np.asarray(jax.random.normal(jax.random.key(4), (D, d))) * 3.0
    dec[0] = 0.0
    dec[1] = 1e-10 / np.sqrt(d)  # norm 1e-10 < 1e-8: divided by the clamp, not by its norm
    out = np.asarray(F.normalize_decoder({"decoder": jnp.asarray(dec, jnp.float32)})["decoder"])
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[2:], 1.0, rtol=1e-6)
    assert np.all(out[0] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(norms[1], 1e-2, rtol=1e-4)
    # idempotent on already-normalized rows
    again = np.asarray(F.normalize_rows(jnp.asarray(out))[2:])
    np.testing.assert_allclose(again, out[2:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_factorizer_layout_and_distributions(arch):
    cfg = FactorizerConfig(architecture=arch, d_features=256, encoder_init_scale=0.05, log_threshold_init=-4.0)
    params, buffers = F.init_factorizer(jax.random.key(5), cfg, 64)
    kernel = np.asarray(params["encoder"]["kernel"])
    assert kernel.shape == (64, 256) and params["decoder"].shape == (256, 64)
    assert abs(kernel.std() - 0.05) < 0.003 and abs(kernel.mean()) < 0.003
    assert not np.any(np.asarray(params["encoder"]["bias"]))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(params["decoder"]), axis=1), 1.0, rtol=1e-5)
    extra = set(params) - {"encoder", "decoder"}
    assert extra == {"jumprelu": {"log_threshold"}, "gated": {"gate_bias", "log_r"}}.get(arch, set())
    if arch == "jumprelu":
        assert np.all(np.asarray(params["log_threshold"]) == np.float32(-4.0))
        assert float(buffers["act_scale_ema"]) == 1.0 and int(buffers["act_scale_init"]) == 0
    if arch == "gated":
        assert not np.any(np.asarray(params["gate_bias"])) and not np.any(np.asarray(params["log_r"]))
    if arch == "batch_topk":
        assert float(buffers["activation_threshold"]) == 0.0 and int(buffers["threshold_initialized"]) == 0
        assert buffers["threshold_initialized"].dtype == jnp.int32
    if arch not in ("jumprelu", "batch_topk"):
        assert buffers == {}


# --------------------------------------------------------------------------------------------
# precision of support-deciding matmuls


def test_supports_match_float64_on_precision_sensitive_inputs():
    """Encoder columns that differ by ~1e-4 relative: bf16/TF32 matmuls would scramble the
    top-k order, full float32 (HIGHEST) keeps the float64 supports away from near-ties."""
    Dn, dn, k, n = 64, 48, 6, 64
    rng = np.random.default_rng(6)
    base = rng.standard_normal(dn)
    kernel = (base[:, None] * (1.0 + 1e-4 * rng.standard_normal((1, Dn))) + 1e-4 * rng.standard_normal((dn, Dn)))
    kernel = kernel.astype(np.float32)
    x = (np.sign(rng.standard_normal((n, 1))) * base[None, :] + 0.01 * rng.standard_normal((n, dn))).astype(np.float32)
    x = np.abs(x @ base)[:, None] / (x @ base)[:, None] * x  # orient rows so activations are positive
    cfg = FactorizerConfig(architecture="topk", d_features=Dn, k=k)
    params = {"encoder": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(Dn)}, "decoder": jnp.eye(Dn, dn)}
    code = np.asarray(F.encode(cfg, params, {}, jnp.asarray(x)))

    acts64 = np.maximum(x.astype(np.float64) @ kernel.astype(np.float64), 0.0)
    srt = -np.sort(-acts64, axis=1)
    gap = (srt[:, k - 1] - srt[:, k]) / np.abs(srt[:, 0])
    clear = gap > 1e-6
    spread = (srt[:, 0] - srt[:, k]) / np.abs(srt[:, 0])
    assert clear.sum() >= n // 2
    assert np.median(spread) < 4e-3  # differences below bf16 resolution: precision matters here
    support64 = _numpy_topk(acts64, k) > 0
    # a bfloat16-input matmul (what reduced precision does on accelerators) scrambles supports here
    bf16 = jnp.matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16), preferred_element_type=jnp.float32)
    flipped = np.any((_numpy_topk(np.maximum(np.asarray(bf16, np.float64), 0.0), k) > 0) != support64, axis=1)
    assert flipped.mean() > 0.5
    np.testing.assert_array_equal((code > 0)[clear], support64[clear])
    # the kept values are the float32 activations to float32 round-off
    np.testing.assert_allclose(code[clear][support64[clear]], acts64[clear][support64[clear]], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Dictionary.encode input validation


@pytest.fixture
def dictionary() -> Dictionary:
    cfg, params, buffers = random_variables("topk", seed=8)
    return Dictionary(config=cfg, params=params, buffers=buffers, d_model=d)


def test_dictionary_encode_accepts_rows_and_single_row(dictionary):
    x = np.asarray(rows(8))
    code = np.asarray(dictionary.encode(x))
    assert code.shape == (B, D)
    np.testing.assert_array_equal(np.asarray(dictionary.encode(x[0])), code[0])
    np.testing.assert_array_equal(np.asarray(dictionary.encode(x.astype(np.float64))), code)


def test_dictionary_encode_rejects_wrong_rank(dictionary):
    with pytest.raises(ShapeError, match="rank") as info:
        dictionary.encode(np.zeros((2, 3, d), np.float32))
    assert isinstance(info.value, ValueError)
    with pytest.raises(ShapeError, match="rank"):
        dictionary.encode(np.float32(1.0))


def test_dictionary_encode_rejects_wrong_last_dim(dictionary):
    with pytest.raises(ShapeError, match=rf"last dimension {d + 1}.*d_model is {d}"):
        dictionary.encode(np.zeros((2, d + 1), np.float32))
    with pytest.raises(ShapeError, match=rf"d_features is {D}"):
        dictionary.decode(np.zeros((2, D - 1), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dictionary_encode_rejects_non_finite(dictionary, bad):
    x = np.asarray(rows(9)).copy()
    x[3, 2] = bad
    with pytest.raises(NonFiniteError, match="NaN/Inf") as info:
        dictionary.encode(x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SrpError)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_dictionary_encode_rejects_integer_input(dictionary, dtype):
    with pytest.raises(ShapeError, match="floating"):
        dictionary.encode(np.ones((2, d), dtype))
