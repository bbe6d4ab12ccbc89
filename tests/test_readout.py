"""Preprocessing and the Readout: reference values, the 1e-8 clamp, the row-mean order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srp_jax.errors import NonFiniteError, ShapeError
from srp_jax.readout import Readout, center_normalize_rows, preprocess_rows, resolve_row_mean

from conftest import load_npz


def test_preprocess_matches_reference():
    W = load_npz("topk", "inputs.npz")["W_U"]
    ref = load_npz("topk", "preprocess.npz")
    mean, norms, x = preprocess_rows(W)
    np.testing.assert_allclose(mean, ref["row_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms, ref["row_norms"], rtol=1e-5)
    np.testing.assert_allclose(x, ref["rows_normalized"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x, ref["rows_normalized_f64"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=1), 1.0, rtol=1e-5)


def test_zero_row_clamps_to_1e_8_and_accepts_torch_tensors():
    W = np.ones((4, 3), np.float32)
    W[1] = [2.0, 0.0, 5.0]
    mean = W.mean(0)
    W[2] = mean  # centered row is exactly 0
    norms, x = center_normalize_rows(torch.from_numpy(W), torch.from_numpy(mean))
    assert float(norms[2]) == pytest.approx(1e-8)
    assert np.all(np.asarray(x[2]) == 0)
    expected = (W[1] - mean) / np.linalg.norm(W[1] - mean)
    np.testing.assert_allclose(x[1], expected, rtol=1e-6)
    # a bfloat16 tensor is read bit-exactly (values representable in bf16 widen without change)
    W_bf = torch.tensor([[1.5, -2.25, 0.0], [3.0, 0.5, -1.0]], dtype=torch.bfloat16)
    mu_bf, norms_bf, x_bf = preprocess_rows(W_bf)
    mu32, norms32, x32 = preprocess_rows(W_bf.float().numpy())
    np.testing.assert_array_equal(np.asarray(mu_bf), np.asarray(mu32))
    np.testing.assert_array_equal(np.asarray(x_bf), np.asarray(x32))


def test_resolve_row_mean_order():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(10, 4)).astype(np.float32)
    mask = np.zeros(10, bool)
    mask[[1, 3, 5]] = True
    stored = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(resolve_row_mean(W, mask, {"row_mean": stored}), stored)
    np.testing.assert_allclose(resolve_row_mean(W, mask), W[[1, 3, 5]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(resolve_row_mean(W), W.mean(0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ShapeError, match="token_mask must have shape"):
        resolve_row_mean(W, np.ones(3, bool))


def test_readout_subsets_and_positions():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(12, 5)).astype(np.float32)
    mask = np.zeros(12, bool)
    mask[[2, 7, 9]] = True
    r = Readout.from_weights(W, token_mask=mask, softcap=30.0)
    np.testing.assert_array_equal(r.row_token_ids, [2, 7, 9])
    np.testing.assert_allclose(r.row_mean, W[[2, 7, 9]].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(r.positions([9, 2]), [2, 0])
    assert r.softcap == 30.0 and r.vocab_size == 3 and r.d_model == 5
    with pytest.raises(ShapeError, match="not among"):
        r.positions([3])
    with pytest.raises(NonFiniteError):
        Readout.from_weights(np.full((3, 2), np.inf, np.float32))
    with pytest.raises(ShapeError, match="rank 2"):
        preprocess_rows(np.ones(5, np.float32))


def test_readout_is_a_pytree_with_a_static_softcap():
    import jax
    import jax.numpy as jnp

    W = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    ro = Readout.from_weights(W, softcap=30.0)
    leaves = jax.tree.leaves(ro)
    assert len(leaves) == 5 and 30.0 not in [np.asarray(x).item() for x in leaves if np.ndim(x) == 0]
    traces = []

    @jax.jit
    def logits(readout, h):
        traces.append(readout.softcap)
        return readout.softcap * jnp.tanh((readout.W_U @ h) / readout.softcap)

    h = jnp.ones(4)
    np.testing.assert_allclose(np.asarray(logits(ro, h)), 30.0 * np.tanh(W @ np.ones(4) / 30.0), rtol=1e-5)
    logits(ro.replace(W_U=ro.W_U * 2.0), h)  # same static part: no retrace
    logits(ro.with_softcap(10.0), h)  # softcap is static: a new trace
    assert traces == [30.0, 10.0]
    batched = jax.vmap(lambda r: r.row_norms.sum())(jax.tree.map(lambda x: jnp.stack([x, x]), ro))
    np.testing.assert_allclose(np.asarray(batched), 2 * [float(np.asarray(ro.row_norms).sum())], rtol=1e-6)
    assert repr(ro) == "Readout(rows=12, d_model=4, dtype=float32, softcap=30)"


def test_center_normalize_and_denormalize_are_inverse():
    from srp_jax.readout import center_normalize, denormalize_rows

    rng = np.random.default_rng(1)
    W = rng.standard_normal((9, 5)).astype(np.float32)
    mu = W.mean(0)
    norms, x = center_normalize(W, mu)
    np.testing.assert_allclose(np.asarray(norms), np.linalg.norm(W - mu, axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(denormalize_rows(x, mu, norms)), W, rtol=1e-5, atol=1e-6)
    # a row equal to the mean keeps norm 1e-8 (the floor) and normalizes to zero
    norms0, x0 = center_normalize(np.stack([mu, W[0]]), mu)
    assert float(norms0[0]) == pytest.approx(1e-8) and not np.any(np.asarray(x0[0]))


def test_readout_take_and_stats():
    W = np.arange(40, dtype=np.float32).reshape(10, 4) ** 1.5
    ro = Readout.from_weights(W, row_token_ids=[2, 5, 7])
    sub = ro.take(np.array([2, 0]))
    assert sub.vocab_size == 2 and list(sub.row_token_ids) == [7, 2]
    np.testing.assert_array_equal(np.asarray(sub.W_U), W[[7, 2]])
    stats = ro.stats()
    assert set(stats) == {"row_mean", "row_norms", "row_token_ids"} and stats["row_token_ids"].dtype == np.int64
