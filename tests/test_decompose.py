"""Decomposition: reference parity, the identity for every architecture and query kind,
batched == looped, sparse == dense, and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srp_jax
from srp_jax import decompose as Dm
from srp_jax.errors import ConfigError, NonFiniteError, ShapeError
from srp_jax.readout import Readout, preprocess_rows

from conftest import load_json, load_npz, random_dictionary, random_readout_inputs, reference_dir

FIELDS = ("original_logit", "base_term", "feature_sum", "residual_term", "reconstructed_logit")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_token_decomposition_matches_reference(arch):
    sae = srp_jax.load_factorizer(reference_dir(arch) / "checkpoint.pt", freeze=True)
    inp = load_npz(arch, "inputs.npz")
    ref = load_npz(arch, "decompose_token_f32.npz")
    k = load_json(arch, "encode.json")["k_used"]
    mu, norms, x = preprocess_rows(inp["W_U"])
    offsets = ref["active_feature_indices_offsets"]
    for i, t in enumerate(inp["token_query_token"]):
        r = Dm.decompose_token_logit(
            h=inp["token_query_h"][i], W_row=inp["W_U"][t], row_mean=mu, row_norm=norms[t],
            row_normalized=x[t], model=sae, k=k,
        )
        for f in FIELDS:
            assert _rel(getattr(r, f), ref[f][i]) <= 1e-5, (f, i)
        assert _rel(r.feature_contributions, ref["feature_contributions"][i]) <= 1e-5
        expected_active = ref["active_feature_indices_concat"][offsets[i]: offsets[i + 1]]
        np.testing.assert_array_equal(np.asarray(r.active_feature_indices), expected_active)
        assert abs(float(r.identity_error)) <= 1e-5


def test_reference_readme_snippet(capsys):
    """The reference README's decomposition snippet, with srp_jax imports."""
    from srp_jax import decompose_token_logit, load_factorizer, preprocess_rows

    W_U = load_npz("topk", "inputs.npz")["W_U"]
    h = load_npz("topk", "inputs.npz")["readme_h"]
    row_mean, row_norms, rows_normalized = preprocess_rows(W_U)
    sae = load_factorizer(str(reference_dir("topk") / "checkpoint.pt"), freeze=True)
    token_id = int(np.argmax(W_U @ h))
    result = decompose_token_logit(
        h=h, W_row=W_U[token_id], row_mean=row_mean, row_norm=row_norms[token_id],
        row_normalized=rows_normalized[token_id], model=sae, k=sae.k,
    )
    print(f"{float(result.original_logit):.4f} = {float(result.base_term):.4f} + "
          f"{float(result.feature_sum):.4f} + {float(result.residual_term):.4f}")
    print("active:", np.asarray(result.active_feature_indices).tolist())
    assert abs(float(result.identity_error)) <= 1e-5
    assert len(result.active_feature_indices) == sae.k == 16
    assert "active:" in capsys.readouterr().out


def _numpy_terms(sae, h, w, mu, k):
    """An independent float64 NumPy decomposition given the code from the shared encoder."""
    h, w, mu = (np.asarray(v, np.float64) for v in (h, w, mu))
    a = max(np.linalg.norm(w - mu), 1e-8)
    x = (w - mu) / a
    code = np.asarray(sae.encode(x.astype(np.float32)[None], k)[0], np.float64)
    dec = np.asarray(sae.params["decoder"], np.float64)
    contrib = a * code * (dec @ h)
    residual = h @ (w - mu - a * (code @ dec))
    return h @ w, h @ mu, contrib, residual


@pytest.mark.parametrize("arch", srp_jax.config.ARCHITECTURES)
def test_identity_and_independent_values_every_architecture(arch):
    sae = random_dictionary(arch)
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    ids = np.array([3, 0, 17, 17, 49, 8, 22])
    batch = Dm.decompose_rows(H, W[ids], mu, norms[ids], x[ids], sae, k=None)
    assert np.max(np.abs(np.asarray(batch.identity_error))) <= 1e-5
    for i, t in enumerate(ids):
        single = Dm.decompose_token_logit(H[i], W[t], mu, norms[t], x[t], sae, None)
        # batched == a loop of single calls
        for f, g in (("original_logit", "original_logit"), ("feature_sum", "feature_sum"),
                     ("residual_term", "residual_term"), ("base_term", "base_term")):
            assert _rel(getattr(batch, g)[i], getattr(single, f)) <= 1e-5
        np.testing.assert_allclose(batch.feature_contributions[i], single.feature_contributions, rtol=1e-5, atol=1e-6)
        assert int(batch.n_active[i]) == len(single.active_feature_indices)
        # against float64 NumPy
        orig, base, contrib, resid = _numpy_terms(sae, H[i], W[t], mu, None)
        assert _rel(single.original_logit, orig) <= 1e-5
        assert _rel(single.base_term, base) <= 1e-5
        assert _rel(single.residual_term, resid) <= 1e-4
        np.testing.assert_allclose(single.feature_contributions, contrib, rtol=1e-4, atol=1e-5)
        # reconstructed = base + feature_sum; contributions vanish off the support
        assert _rel(single.reconstructed_logit, float(single.base_term) + float(single.feature_sum)) <= 1e-6
        off = np.setdiff1d(np.arange(sae.d_features), np.asarray(single.active_feature_indices))
        assert np.all(np.asarray(single.feature_contributions)[off] == 0)


def test_vmap_of_pure_kernel_equals_batched_call():
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    ids = np.arange(7)
    fn = lambda h, w, a, xr: Dm.token_terms(sae.config, 4, sae.params, sae.buffers, h, w, mu, a, xr)
    t = jax.jit(jax.vmap(fn))(jnp.asarray(H), W[ids], norms[ids], x[ids])
    b = Dm.decompose_rows(H, W[ids], mu, norms[ids], x[ids], sae, k=4)
    np.testing.assert_allclose(t["contributions"], b.feature_contributions, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(b.n_active) <= 4)


@pytest.mark.parametrize("k", [None, 3])
def test_sparse_layout_equals_dense(k):
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    readout = Readout.from_weights(W)
    ids = np.array([5, 1, 9, 33, 2, 2, 40])
    dense = Dm.decompose_tokens(H, ids, readout, sae, k)
    sparse = Dm.decompose_tokens(H, ids, readout, sae, k, sparse=True)
    kk = sae.config.resolve_k(k)
    assert sparse.feature_indices.shape == (7, kk)
    assert not np.any(np.asarray(sparse.truncated))
    for i in range(7):
        idx = np.asarray(sparse.feature_indices[i])
        valid = idx >= 0
        assert np.all(np.diff(idx[valid]) > 0)  # ascending
        np.testing.assert_array_equal(idx[valid], np.flatnonzero(np.asarray(dense.feature_contributions[i])))
        np.testing.assert_allclose(
            np.asarray(sparse.feature_contributions[i])[valid],
            np.asarray(dense.feature_contributions[i])[idx[valid]], rtol=1e-5, atol=1e-6,
        )
    np.testing.assert_allclose(sparse.feature_sum, dense.feature_sum, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(sparse.identity_error))) <= 1e-5


def test_sparse_truncation_is_flagged_for_dense_architectures():
    sae = random_dictionary("l1_relu")
    W, H = random_readout_inputs()
    readout = Readout.from_weights(W)
    with pytest.raises(ConfigError, match="max_active"):
        Dm.decompose_tokens(H, np.arange(7), readout, sae, sparse=True)
    out = Dm.decompose_tokens(H, np.arange(7), readout, sae, sparse=True, max_active=3)
    assert np.all(np.asarray(out.truncated) == (np.asarray(out.n_active) > 3))
    assert np.any(np.asarray(out.truncated))


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_margins_and_coverage_match_reference(arch):
    sae = srp_jax.load_factorizer(reference_dir(arch) / "checkpoint.pt")
    inp = load_npz(arch, "inputs.npz")
    ref = load_npz(arch, "margin.npz")
    queries = load_json(arch, "margin.json")["queries"]
    k = load_json(arch, "encode.json")["k_used"]
    mu, _, _ = preprocess_rows(inp["W_U"])
    for i, q in enumerate(queries):
        m = Dm.margin_from_rows(inp["pair_query_h"][i], int(inp["pair_query_A"][i]), int(inp["pair_query_B"][i]),
                                sae, W_U=inp["W_U"], row_mean=mu, k=k)
        assert abs(float(m.exact) - ref["exact"][i]) <= 1e-5 * max(1, abs(ref["exact"][i]))
        assert abs(float(m.sparse) - ref["sparse"][i]) <= 1e-5 * max(1, abs(ref["sparse"][i]))
        assert abs(float(m.resid_term) - ref["resid_term"][i]) <= 1e-5 * max(1, abs(ref["resid_term"][i]))
        np.testing.assert_allclose(m.feat_margin, ref["feat_margin"][i], atol=1e-6, rtol=1e-5)
        cov = Dm.coverage_stats(m.feat_margin, float(m.sparse))
        for key, value in q["coverage_stats"].items():
            if isinstance(value, int) and "feat" in key:
                assert cov[key] == value, key
            else:
                assert abs(cov[key] - value) <= 1e-4 * max(1.0, abs(value)), key


def test_margin_family_is_uniform_mean_of_rows():
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    fam = Dm.margin_from_rows(H[0], [1, 2, 3], [4, 5], sae, W_U=W, row_mean=mu)
    singles = {t: Dm.decompose_token_logit(H[0], W[t], mu, norms[t], x[t], sae) for t in range(1, 6)}
    exp_exact = np.mean([float(singles[t].original_logit) for t in (1, 2, 3)]) - np.mean(
        [float(singles[t].original_logit) for t in (4, 5)])
    exp_feat = np.mean([singles[t].feature_contributions for t in (1, 2, 3)], axis=0) - np.mean(
        [singles[t].feature_contributions for t in (4, 5)], axis=0)
    assert abs(float(fam.exact) - exp_exact) <= 1e-5
    np.testing.assert_allclose(fam.feat_margin, exp_feat, atol=1e-6)
    assert abs(float(fam.residual) - float(fam.resid_term)) <= 1e-4


# ---------------------------------------------------------------- general queries


class _FakeTokenizer:
    """Maps ' cat' / 'cat' style strings to ids, multi-token for anything with a dash."""

    vocab = {" cat": 3, "dog": 4, " dog": 5, " red": 7, " blue": 8}

    def encode(self, text, add_special_tokens=False):
        if "-" in text:
            return [1, 2]
        return [self.vocab[text]] if text in self.vocab else [9, 9]


def test_build_query_weights_every_kind():
    logits = np.array([0.1, 5.0, 3.0, 4.0, -1.0, 2.0], np.float32)
    w, m, _ = Dm.build_query_weights("selected_token", target=2)
    assert w == {2: 1.0} and m == 0.0
    w, m, _ = Dm.build_query_weights("target_vs_vocab_mean", target=2)
    assert w == {2: 1.0} and m == 1.0
    w, m, _ = Dm.build_query_weights("pairwise_margin", target_a=1, target_b=4)
    assert w == {1: 1.0, 4: -1.0}
    w, _, _ = Dm.build_query_weights("pairwise_margin", target_a=3, target_b=3)
    assert w == {3: 0.0}  # merged additively
    w, _, _ = Dm.build_query_weights("token_family_margin", target_family=[1, 2, 3], contrast_family=[3, 4])
    assert w[1] == pytest.approx(1 / 3) and w[3] == pytest.approx(1 / 3 - 1 / 2) and w[4] == pytest.approx(-0.5)
    w, _, meta = Dm.build_query_weights("winner_vs_topk", logits=logits, top_competitors=2)
    comp = np.exp([4.0, 3.0]) / np.exp([4.0, 3.0]).sum()  # competitors: ids 3 and 2
    assert w[1] == 1.0 and w[3] == pytest.approx(-comp[0], rel=1e-6) and w[2] == pytest.approx(-comp[1], rel=1e-6)
    assert meta["contrast_token_ids"] == [3, 2]
    w, _, meta = Dm.build_query_weights("winner_vs_rank", logits=logits, competitor_rank=3)
    assert w == {1: 1.0, 2: -1.0} and meta["competitor_rank"] == 3
    w, _, _ = Dm.build_query_weights("winner_vs_rank", logits=logits, competitor_rank=1)
    assert w == {1: 1.0, 3: -1.0}  # rank floors at 2


def test_token_strings_resolve_with_a_leading_space_first():
    tok = _FakeTokenizer()
    assert Dm.resolve_single_token(tok, "cat") == 3
    assert Dm.resolve_single_token(tok, "dog") == 5  # " dog" wins over "dog"
    assert Dm.resolve_single_token(tok, "x-y") is None
    w, _, _ = Dm.build_query_weights("token_family_margin", target_family=["red", "x-y"],
                                     contrast_family=["blue"], tokenizer=tok)
    assert w == {7: 1.0, 8: -1.0}  # the multi-token member is dropped
    with pytest.raises(ConfigError, match="did not resolve"):
        Dm.build_query_weights("selected_token", target="x-y", tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        Dm.build_query_weights("selected_token", target="cat")
    with pytest.raises(ConfigError, match="empty"):
        Dm.build_query_weights("token_family_margin", target_family=["x-y"], contrast_family=["blue"], tokenizer=tok)
    with pytest.raises(ConfigError, match="unknown query kind"):
        Dm.build_query_weights("nope", target=1)
    with pytest.raises(ConfigError, match="logits"):
        Dm.build_query_weights("winner_vs_topk")


@pytest.mark.parametrize("arch", srp_jax.config.ARCHITECTURES)
def test_query_identity_every_kind(arch):
    sae = random_dictionary(arch, seed=3)
    W, H = random_readout_inputs(seed=4)
    mu = np.asarray(preprocess_rows(W)[0])
    h = H[2]
    logits = W @ h
    specs = [
        dict(query_kind="selected_token", target=4),
        dict(query_kind="target_vs_vocab_mean", target=4),
        dict(query_kind="pairwise_margin", target_a=4, target_b=9),
        dict(query_kind="token_family_margin", target_family=[1, 2], contrast_family=[3, 4, 5]),
        dict(query_kind="winner_vs_topk", logits=logits, top_competitors=5),
        dict(query_kind="winner_vs_rank", logits=logits, competitor_rank=4),
    ]
    for spec in specs:
        kind = spec.pop("query_kind")
        weights, m, _ = Dm.build_query_weights(kind, **spec)
        q = Dm.decompose_query(h, weights, sae, W_U=W, row_mean=mu, mean_subtract=m)
        # exact = base + features + residual, and exact equals the direct score
        direct = sum(a * float(W[t] @ h) for t, a in weights.items()) - m * float(mu @ h)
        assert abs(float(q.exact_score) - direct) <= 1e-4 * max(1, abs(direct))
        assert abs(float(q.exact_score) - float(q.approx_score) - float(q.residual)) <= 1e-5
        assert float(q.identity_abs_error) <= 1e-4
        assert abs(float(q.approx_score) - float(q.base_term) - float(q.sparse_feature_sum)) <= 1e-5
        if abs(sum(weights.values()) - m) < 1e-6:
            assert abs(float(q.base_term)) <= 1e-6  # contrasts and vocab-mean queries have no base
        # the residual is the query's residual rows seen by h (an independent construction)
        res = 0.0
        for t, a in weights.items():
            d = Dm.decompose_token_logit(h, W[t], mu, max(np.linalg.norm(W[t] - mu), 1e-8),
                                         (W[t] - mu) / max(np.linalg.norm(W[t] - mu), 1e-8), sae)
            res += a * float(d.residual_term)
        assert abs(float(q.residual) - res) <= 1e-4 * max(1, abs(res))
        rows = q.feature_rows()
        assert [r["feature_rank_active"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r["query_feature_coeff"] != 0 for r in rows)
        assert [r["feature_id"] for r in rows] == sorted(r["feature_id"] for r in rows)


def test_selected_token_query_equals_token_decomposition():
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    q = Dm.decompose_query(H[0], {7: 1.0}, sae, W_U=W, row_mean=mu)
    d = Dm.decompose_token_logit(H[0], W[7], mu, norms[7], x[7], sae)
    assert _rel(q.exact_score, d.original_logit) <= 1e-6
    assert _rel(q.sparse_feature_sum, d.feature_sum) <= 1e-5
    np.testing.assert_array_equal(np.asarray(q.feature_ids), np.asarray(d.active_feature_indices))
    # passed-in logits are used for `exact`, and the identity check reports the gap
    logits = W @ H[0]
    logits[7] += 0.25
    q2 = Dm.decompose_query(H[0], {7: 1.0}, sae, W_U=W, row_mean=mu, logits=logits)
    assert abs(float(q2.identity_abs_error) - 0.25) <= 1e-5
    s = q.summary()
    assert s["n_active_features"] == len(d.active_feature_indices) and s["weight_sum"] == 1.0


def test_exact_cancellation_drops_a_feature():
    """A pair A == B merges to weight 0: every coefficient cancels and no feature is active."""
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    weights, _, _ = Dm.build_query_weights("pairwise_margin", target_a=5, target_b=5)
    q = Dm.decompose_query(H[0], weights, sae, W_U=W)
    assert q.n_active_features == 0 and float(q.exact_score) == 0.0 and float(q.residual) == 0.0
    q1 = Dm.decompose_query(H[0], {5: 1.0, 6: 0.0}, sae, W_U=W)
    q5 = Dm.decompose_query(H[0], {5: 1.0}, sae, W_U=W)
    np.testing.assert_array_equal(np.asarray(q1.feature_ids), np.asarray(q5.feature_ids))


# ---------------------------------------------------------------- errors


def test_decompose_input_errors():
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    with pytest.raises(ShapeError, match="h must be a single hidden vector"):
        Dm.decompose_token_logit(H[:2], W[0], mu, norms[0], x[0], sae)
    with pytest.raises(ShapeError, match="W_row must be a single unembedding row"):
        Dm.decompose_token_logit(H[0], W[:2], mu, norms[0], x[0], sae)
    with pytest.raises(ShapeError, match="d_model is 24"):
        Dm.decompose_token_logit(H[0][:10], W[0][:10], mu[:10], norms[0], x[0][:10], sae)
    bad = H[0].copy()
    bad[3] = np.nan
    with pytest.raises(NonFiniteError, match="h contains 1 NaN/Inf"):
        Dm.decompose_token_logit(bad, W[0], mu, norms[0], x[0], sae)
    with pytest.raises(ShapeError, match="floating-point"):
        Dm.decompose_token_logit(np.arange(24), W[0], mu, norms[0], x[0], sae)
    with pytest.raises(ConfigError, match="loaded dictionary"):
        Dm.decompose_token_logit(H[0], W[0], mu, norms[0], x[0], model=object())
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        Dm.decompose_query(H[0], {999: 1.0}, sae, W_U=W)
    with pytest.raises(ShapeError, match="has 3 rows but h has 7"):
        Dm.decompose_rows(H, W[:3], mu, norms[:3], x[:3], sae)
    with pytest.raises(ShapeError, match="not among this readout's rows"):
        Dm.decompose_tokens(H[:1], [3], Readout.from_weights(W, row_token_ids=[0, 2, 5]), sae)
    assert isinstance(ShapeError("x"), ValueError)  # reference-style except clauses keep working


def test_batch_topk_needs_a_threshold_and_eval_mode():
    sae = random_dictionary("batch_topk")
    sae.buffers = {"activation_threshold": jnp.float32(0), "threshold_initialized": jnp.int32(0)}
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    with pytest.raises(RuntimeError, match="threshold"):
        Dm.decompose_token_logit(H[0], W[0], mu, norms[0], x[0], sae)
