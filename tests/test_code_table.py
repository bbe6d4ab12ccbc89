"""The cached vocabulary codes and the sparse decompositions / reconstructions built on them.

Expectations are independent: the dense eval encode (``F.encode``) and dense decode, and the
decomposition identity h . w = base + feature_sum + residual_term.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srp_jax
from srp_jax import factorizers as F
from srp_jax.config import FactorizerConfig
from srp_jax.decompose import (
    CodeTable,
    build_code_table,
    cached_code_table,
    clear_code_tables,
    code_table,
    decompose_rows,
    decompose_tokens,
)
from srp_jax.dictionary import Dictionary
from srp_jax.errors import ConfigError, ShapeError
from srp_jax.metrics import feature_usage, reconstruct_rows

V, d, D, k = 203, 16, 64, 6


def _dictionary(arch="topk", seed=0, **opts):
    cfg = FactorizerConfig(arch, D, k, **opts)
    params, buffers = F.init_factorizer(jax.random.PRNGKey(seed), cfg, d)
    # a negative bias so that some rows have fewer than k positive pre-activations
    params["encoder"]["bias"] = params["encoder"]["bias"] - 0.05
    return Dictionary(config=cfg, params=params, buffers=buffers, d_model=d)


@pytest.fixture(scope="module")
def readout():
    W = np.random.default_rng(0).standard_normal((V, d)).astype(np.float32)
    return srp_jax.Readout.from_weights(W)


def _dense_code(dic, rows, kk=k):
    return np.asarray(F.encode(dic.config, dic.params, dic.buffers, jnp.asarray(rows), kk))


def test_table_holds_exactly_the_eval_codes(readout):
    dic = _dictionary()
    table = build_code_table(dic, readout, k, row_batch=50)  # several blocks, a ragged last one
    assert isinstance(table, CodeTable) and table.values.shape == (V, k) and table.indices.dtype == jnp.int32
    dense = _dense_code(dic, readout.rows_normalized)
    n_active = (dense != 0).sum(1)
    assert n_active.min() < k  # rows with padding are exercised
    np.testing.assert_array_equal(np.asarray(table.n_active), n_active)
    idx, vals = np.asarray(table.indices), np.asarray(table.values)
    for t in range(V):
        nz = np.flatnonzero(dense[t])
        np.testing.assert_array_equal(idx[t, : nz.size], nz)  # ascending feature order
        np.testing.assert_array_equal(vals[t, : nz.size], dense[t, nz])  # the same float32 bits
        assert np.all(idx[t, nz.size :] == -1) and np.all(vals[t, nz.size :] == 0)
    # a table built in other blocks is identical
    again = build_code_table(dic, readout, k, row_batch=V)
    np.testing.assert_array_equal(np.asarray(again.values), vals)
    np.testing.assert_array_equal(np.asarray(again.indices), idx)


def test_code_table_cache_by_identity(readout):
    clear_code_tables()
    dic = _dictionary()
    assert cached_code_table(dic, readout, k) is None
    t1 = code_table(dic, readout, k)
    assert code_table(dic, readout, None) is t1  # None = the trained k
    assert cached_code_table(dic, readout, k) is t1
    assert code_table(dic, readout, 3) is not t1 and code_table(dic, readout, 3).k == 3
    # new parameters (e.g. after training) get a new table, never a stale one
    newer = Dictionary(config=dic.config, params=jax.tree.map(lambda a: a + 0.0, dic.params), buffers={}, d_model=d)
    assert cached_code_table(newer, readout, k) is None and code_table(newer, readout, k) is not t1
    n = len(srp_jax.decompose.codes._CACHE)
    del newer
    gc.collect()
    assert len(srp_jax.decompose.codes._CACHE) < n  # entries die with their dictionary
    clear_code_tables()
    assert cached_code_table(dic, readout, k) is None


@pytest.mark.parametrize("arch, opts", [("topk", {}), ("matryoshka_topk", {"k_values": (3, 6)})])
def test_sparse_decompositions_equal_dense_and_hold_the_identity(readout, arch, opts):
    clear_code_tables()
    dic = _dictionary(arch, **opts)
    rng = np.random.default_rng(1)
    H = rng.standard_normal((40, d)).astype(np.float32)
    ids = rng.integers(0, V, 40)
    dense = decompose_tokens(H, ids, readout, dic, k)
    fresh = decompose_tokens(H, ids, readout, dic, k, sparse=True)
    table = build_code_table(dic, readout, k)
    cached = decompose_tokens(H, ids, readout, dic, k, sparse=True, codes=table)
    pos = np.asarray(readout.positions(ids))
    rows = decompose_rows(H, readout.W_U[pos], readout.row_mean, readout.row_norms[pos],
                          readout.rows_normalized[pos], dic, k, sparse=True)
    scale = float(np.max(np.abs(np.asarray(dense.original_logit))))
    contrib = np.asarray(dense.feature_contributions)
    for out in (fresh, cached, rows):
        for name in ("original_logit", "base_term", "feature_sum", "residual_term", "reconstructed_logit"):
            np.testing.assert_allclose(getattr(out, name), getattr(dense, name), atol=2e-6 * scale, err_msg=name)
        np.testing.assert_array_equal(np.asarray(out.n_active), np.asarray(dense.n_active))
        assert not np.any(np.asarray(out.truncated))
        idx = np.asarray(out.feature_indices)
        for b in range(40):
            nz = np.flatnonzero(contrib[b] != 0)
            listed = idx[b][idx[b] >= 0]
            assert set(nz) <= set(listed.tolist()) and np.all(np.diff(listed) > 0)
            np.testing.assert_allclose(np.asarray(out.feature_contributions)[b][idx[b] >= 0], contrib[b, listed],
                                       rtol=1e-5, atol=1e-7)
        # the identity holds to round-off
        total = np.asarray(out.base_term) + np.asarray(out.feature_sum) + np.asarray(out.residual_term)
        np.testing.assert_allclose(total, np.asarray(out.original_logit), atol=2e-6 * scale)
        assert float(np.max(np.abs(np.asarray(out.identity_error)))) <= 2e-6 * scale
    for name in ("feature_sum", "residual_term", "identity_error"):
        np.testing.assert_array_equal(np.asarray(getattr(cached, name)), np.asarray(getattr(fresh, name)))


def test_sparse_truncation_and_misuse(readout):
    dic = _dictionary()
    rng = np.random.default_rng(2)
    H = rng.standard_normal((20, d)).astype(np.float32)
    ids = rng.integers(0, V, 20)
    dense = decompose_tokens(H, ids, readout, dic, k)
    cut = decompose_tokens(H, ids, readout, dic, k, sparse=True, max_active=2)
    contrib = np.asarray(dense.feature_contributions)
    code = _dense_code(dic, readout.rows_normalized[np.asarray(readout.positions(ids))])
    for b in range(20):
        # the two largest |code| entries are listed; the residual keeps the whole code
        top = np.sort(np.argsort(-np.abs(code[b]), kind="stable")[:2])
        listed = np.asarray(cut.feature_indices)[b]
        want = top[code[b, top] != 0]
        np.testing.assert_array_equal(listed[listed >= 0], want)
        dropped = contrib[b].sum() - contrib[b, want].sum()
        np.testing.assert_allclose(float(cut.identity_error[b]), dropped, atol=1e-5)
    assert np.array_equal(np.asarray(cut.truncated), (code != 0).sum(1) > 2)
    table = build_code_table(dic, readout, k)
    with pytest.raises(ConfigError, match="sparse=True"):
        decompose_tokens(H, ids, readout, dic, k, codes=table)
    with pytest.raises(ConfigError, match="at k 3"):
        decompose_tokens(H, ids, readout, dic, 3, sparse=True, codes=table)
    with pytest.raises(ShapeError, match="rows"):
        short = srp_jax.Readout.from_weights(np.asarray(readout.W_U)[:50])
        decompose_tokens(H, ids % 50, short, dic, k, sparse=True, codes=table)
    jr = Dictionary(config=FactorizerConfig("jumprelu", D), params=F.init_factorizer(jax.random.PRNGKey(0), FactorizerConfig("jumprelu", D), d)[0],
                    buffers=F.init_buffers(FactorizerConfig("jumprelu", D)), d_model=d)
    with pytest.raises(ConfigError, match="TopK family"):
        build_code_table(jr, readout)


@pytest.mark.parametrize("encode_rows,row_batch,unrolled", [(None, 64, 64), (16, 64, 64), (16, 40, 64), (16, 64, 2)])
def test_reconstruction_and_usage_through_the_sparse_path(readout, encode_rows, row_batch, unrolled, monkeypatch, request):
    """Equal to the dense code's decode whatever the encoder blocks: one block per chunk,
    four (each encoded and decoded on its own), a chunk the blocks do not divide, and more
    blocks than are written out (one encode and decode of the chunk)."""
    from srp_jax.factorizers import sparse as S
    if encode_rows is not None:
        monkeypatch.setattr(S, "CPU_ENCODE_ELEMENTS", encode_rows * D)
        monkeypatch.setattr(S, "MAX_UNROLLED_ENCODE_BLOCKS", unrolled)
        jax.clear_caches()  # the passes' jit cache is keyed by config, k and row_batch, not by this
        request.addfinalizer(jax.clear_caches)  # nor may later tests reuse these programs
    dic = _dictionary()
    X = np.asarray(readout.rows_normalized)
    recon_x, recon_W, usage, l0 = reconstruct_rows(dic, X, readout.row_mean, readout.row_norms, k, row_batch=row_batch)
    code = _dense_code(dic, X)
    want = np.asarray(F.decode(dic.params, jnp.asarray(code)))
    np.testing.assert_allclose(recon_x, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(recon_W, np.asarray(readout.row_mean) + np.asarray(readout.row_norms)[:, None] * want,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(usage, (code > 0).sum(0))
    np.testing.assert_array_equal(l0, (code > 0).sum(1))
    np.testing.assert_array_equal(feature_usage(dic, X, k, row_batch=37), (code > 0).sum(0))
    # k >= D: the dense path (every feature may be active)
    _, _, usage_all, _ = reconstruct_rows(dic, X, readout.row_mean, readout.row_norms, D)
    np.testing.assert_array_equal(usage_all, (_dense_code(dic, X, D) > 0).sum(0))


def test_full_vocabulary_passes_default_to_the_backends_chunk(readout, monkeypatch):
    """row_batch None: long chunks on CPU (CPU_PASS_ELEMENTS pre-activations, a power of two,
    at least PASS_ROWS), PASS_ROWS elsewhere; the results equal an explicit small chunking."""
    from srp_jax.factorizers import sparse as S
    assert S.default_pass_rows(9216) == 4096 and S.default_pass_rows(32768) == 2048
    assert S.default_pass_rows(1 << 20) == S.PASS_ROWS == 1024 and S.default_pass_rows(D) == 1 << 20
    dic = _dictionary()
    leaves = jax.tree.leaves(dic.params)
    assert S.pass_rows(37, D, *leaves) == 37 and S.pass_rows(None, D, *leaves) == S.default_pass_rows(D)
    X = np.asarray(readout.rows_normalized)
    monkeypatch.setattr(S, "CPU_PASS_ELEMENTS", 64 * D)  # a 64-row chunk: several chunks, a ragged last
    monkeypatch.setattr(S, "PASS_ROWS", 16)
    assert S.pass_rows(None, D, *leaves) == 64
    small = reconstruct_rows(dic, X, readout.row_mean, readout.row_norms, k, row_batch=17)
    default = reconstruct_rows(dic, X, readout.row_mean, readout.row_norms, k)
    for a, b in zip(small, default):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(feature_usage(dic, X, k), small[2])
    np.testing.assert_array_equal(np.asarray(build_code_table(dic, readout, k).indices),
                                  np.asarray(build_code_table(dic, readout, k, row_batch=17).indices))
    monkeypatch.setattr(S, "is_spread", lambda a: a is leaves[0])  # as if on a mesh: the short chunk
    assert S.pass_rows(None, D, *leaves) == 16
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert S.default_pass_rows(9216) == S.PASS_ROWS == 16
