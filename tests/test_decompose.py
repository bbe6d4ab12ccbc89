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
    for bad in (-3, 0, 2.5, True):
        with pytest.raises(ConfigError, match="max_active must be a positive integer"):
            Dm.decompose_rows(H, W[:7], mu, norms[:7], x[:7], sae, sparse=True, max_active=bad)
    with pytest.raises(ShapeError, match=r"feat_margin must be a non-empty vector"):
        Dm.coverage_stats(np.ones((2, 3)), 1.0)
    with pytest.raises(ConfigError, match="checkpoint must be a path"):
        srp_jax.load_factorizer(42)
    assert isinstance(ShapeError("x"), ValueError)  # reference-style except clauses keep working


def test_batch_topk_needs_a_threshold_and_eval_mode():
    sae = random_dictionary("batch_topk")
    sae.buffers = {"activation_threshold": jnp.float32(0), "threshold_initialized": jnp.int32(0)}
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    with pytest.raises(RuntimeError, match="threshold"):
        Dm.decompose_token_logit(H[0], W[0], mu, norms[0], x[0], sae)


def _query_specs(logits):
    return [
        ("selected_token", dict(target=4), 0.0),
        ("target_vs_vocab_mean", dict(target=4), 1.0),
        ("pairwise_margin", dict(target_a=4, target_b=9), 0.0),
        ("token_family_margin", dict(target_family=[1, 2], contrast_family=[3, 4, 5]), 0.0),
        ("winner_vs_topk", dict(logits=logits, top_competitors=5), 0.0),
        ("winner_vs_rank", dict(logits=logits, competitor_rank=4), 0.0),
    ]


@pytest.mark.parametrize("arch", srp_jax.config.ARCHITECTURES)
def test_batched_queries_equal_single_calls_every_kind(arch):
    """decompose_queries over B (h, query) pairs == a loop of decompose_query, and the
    identity exact = base + features + residual holds per query."""
    sae = random_dictionary(arch, seed=8)
    W, H = random_readout_inputs(seed=9)
    mu = np.asarray(preprocess_rows(W)[0])
    queries, means, hs = [], [], []
    for b in range(H.shape[0]):
        for kind, spec, m in _query_specs(W @ H[b]):
            weights, m_built, _ = Dm.build_query_weights(kind, **spec)
            assert m_built == m
            queries.append(weights)
            means.append(m)
            hs.append(H[b])
    Hb = np.stack(hs)
    batch = Dm.decompose_queries(Hb, queries, sae, W_U=W, row_mean=mu, mean_subtract=np.array(means))
    assert len(batch) == Hb.shape[0] and batch.contributions.shape == (Hb.shape[0], sae.d_features)
    ident = np.asarray(batch.exact_score) - np.asarray(batch.base_term) - np.asarray(batch.feature_sum) - np.asarray(batch.residual)
    assert np.max(np.abs(ident)) <= 1e-5
    assert np.max(np.asarray(batch.identity_abs_error)) <= 1e-4
    for b, (h, weights, m) in enumerate(zip(hs, queries, means)):
        q = Dm.decompose_query(h, weights, sae, W_U=W, row_mean=mu, mean_subtract=m)
        for single, batched in [(q.exact_score, batch.exact_score), (q.base_term, batch.base_term),
                                (q.sparse_feature_sum, batch.feature_sum), (q.residual, batch.residual),
                                (q.approx_score, batch.approx_score)]:
            assert _rel(batched[b], single) <= 1e-5
        active = np.flatnonzero(np.asarray(batch.active_mask[b]))
        np.testing.assert_array_equal(active, np.asarray(q.feature_ids))
        np.testing.assert_allclose(np.asarray(batch.contributions[b])[active], np.asarray(q.contributions),
                                   rtol=1e-5, atol=1e-6)
        assert int(batch.sign_preserved[b]) == int(q.sign_preserved)


def test_batched_queries_accept_one_query_padded_arrays_and_logits():
    sae = random_dictionary("topk", seed=2)
    W, H = random_readout_inputs(seed=3)
    one = Dm.decompose_queries(H, {4: 1.0, 9: -1.0}, sae, W_U=W)
    # padded arrays: the second slot of a single-token query is (id 0, weight 0) and adds nothing
    ids = np.array([[4, 9]] * H.shape[0])
    padded = Dm.decompose_queries(H, (ids, np.array([[1.0, -1.0]] * H.shape[0])), sae, W_U=W)
    np.testing.assert_allclose(np.asarray(one.exact_score), np.asarray(padded.exact_score), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(one.exact_score), (W[4] - W[9]) @ H.T, rtol=1e-5, atol=1e-5)
    single = Dm.decompose_queries(H, (np.array([[4, 0]] * H.shape[0]), np.array([[1.0, 0.0]] * H.shape[0])), sae, W_U=W)
    np.testing.assert_allclose(np.asarray(single.exact_score), W[4] @ H.T, rtol=1e-5, atol=1e-5)
    # caller logits feed `exact`; the identity check reports the gap
    logits = H @ W.T
    logits[:, 4] += 0.5
    shifted = Dm.decompose_queries(H, {4: 1.0}, sae, W_U=W, logits=logits)
    np.testing.assert_allclose(np.asarray(shifted.identity_abs_error), 0.5, atol=1e-4)
    with pytest.raises(ShapeError, match="3 queries for 7 hidden states"):
        Dm.decompose_queries(H, [{1: 1.0}] * 3, sae, W_U=W)
    with pytest.raises(NonFiniteError, match="query weights"):
        Dm.decompose_queries(H, {1: float("nan")}, sae, W_U=W)
    with pytest.raises(ShapeError, match="logits have shape"):
        Dm.decompose_queries(H, {1: 1.0}, sae, W_U=W, logits=logits[:, :3])


def test_token_targets_accept_zero_d_arrays_of_any_framework():
    torch = pytest.importorskip("torch")
    logits = np.array([0.0, 3.0, 1.0, 7.0])
    for target in (jnp.argmax(jnp.asarray(logits)), np.int64(3), np.array(3), torch.argmax(torch.tensor(logits))):
        w, _, meta = Dm.build_query_weights("selected_token", target=target)
        assert w == {3: 1.0} and meta["target_token_id"] == 3
    w, _, _ = Dm.build_query_weights("token_family_margin", target_family=jnp.array([1, 2]),
                                     contrast_family=torch.tensor([3]))
    assert w == {1: 0.5, 2: 0.5, 3: -1.0}
    for bad in (jnp.float32(2.0), np.array([1, 2]), True, 2.0):
        with pytest.raises(ConfigError, match="token id"):
            Dm.build_query_weights("selected_token", target=bad)


def test_k_must_be_an_integer():
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    d = Dm.decompose_token_logit(H[0], W[0], mu, norms[0], x[0], sae, k=np.int64(3))
    assert int(np.asarray(d.active_feature_indices).size) <= 3
    for bad in (2.5, "3", np.array([2, 3]), True):
        with pytest.raises(ConfigError, match="k must be an integer"):
            Dm.decompose_token_logit(H[0], W[0], mu, norms[0], x[0], sae, k=bad)
    with pytest.raises(ConfigError, match="k must be an integer"):
        Dm.decompose_rows(H, W[:7], mu, norms[:7], x[:7], sae, k=2.5)


def test_readout_rows_all_reaches_tokens_outside_the_trained_rows():
    sae = random_dictionary("topk")
    W, H = random_readout_inputs()
    mu = np.asarray(preprocess_rows(W)[0])
    sae.row_mean = jnp.asarray(mu + 0.01)
    sae.row_token_ids = np.arange(0, W.shape[0], 2)
    trained = Readout.for_dictionary(W, sae)
    assert trained.vocab_size == len(sae.row_token_ids)
    with pytest.raises(ShapeError, match="rows='all'"):
        Dm.decompose_tokens(H[:1], [3], trained, sae)
    everything = Readout.for_dictionary(W, sae, rows="all")
    np.testing.assert_array_equal(np.asarray(everything.row_mean), np.asarray(sae.row_mean))
    batch = Dm.decompose_tokens(H[:2], [3, 4], everything, sae)
    c = W[3] - (mu + 0.01)
    single = Dm.decompose_token_logit(H[0], W[3], mu + 0.01, np.linalg.norm(c), c / np.linalg.norm(c), sae)
    assert _rel(batch.feature_sum[0], single.feature_sum) <= 1e-5
    assert _rel(batch.original_logit[0], W[3] @ H[0]) <= 1e-5
    with pytest.raises(ConfigError, match="rows must be"):
        Readout.for_dictionary(W, sae, rows="some")


def _dot_precisions(jaxpr) -> list:
    """Every dot_general precision in a jaxpr, sub-jaxprs (jit, vmap, cond, custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_dot_precisions(inner))
    return found


@pytest.mark.parametrize("arch", srp_jax.config.ARCHITECTURES)
def test_support_and_decomposition_matmuls_request_highest_precision(arch):
    """CPU ignores matmul precision, so check what is asked of the compiler: every dot in the
    encoder and in the token / query kernels is HIGHEST (GPU/TPU would otherwise use TF32/bf16)."""
    from srp_jax import factorizers as F

    sae = random_dictionary(arch)
    W, H = random_readout_inputs()
    mu, norms, x = preprocess_rows(W)
    highest = jax.lax.Precision.HIGHEST
    cfg, params, buffers = sae.config, sae.params, sae.buffers
    jaxprs = [
        jax.make_jaxpr(lambda xx: F.encode(cfg, params, buffers, xx))(x),
        jax.make_jaxpr(lambda h, w, a, xr: Dm.token_terms(cfg, None, params, buffers, h, w, mu, a, xr))(
            H[0], W[0], norms[0], x[0]),
        jax.make_jaxpr(lambda h, rows: Dm.query_terms(cfg, None, params, buffers, h, rows, jnp.ones(2),
                                                      jnp.ones(2), mu, jnp.float32(0)))(H[0], W[:2]),
    ]
    for jp in jaxprs:
        precisions = _dot_precisions(jp.jaxpr)
        assert precisions, "no matmul found"
        assert all(p is not None and all(q == highest for q in p) for p in precisions), precisions


def test_load_factorizer_device_accepts_torch_spellings():
    torch = pytest.importorskip("torch")
    from srp_jax.dictionary import resolve_device

    cpu = jax.devices("cpu")[0]
    for spec in ("cpu", "CPU", "cpu:0", torch.device("cpu"), torch.device("cpu", 0), cpu):
        assert resolve_device(spec) == cpu, spec
    ckpt = random_dictionary("topk").to_checkpoint_dict()
    d = srp_jax.load_factorizer(ckpt, device="cpu:0")
    assert d.params["decoder"].devices() == {cpu}
    for bad, needle in (("cpu:7", "out of range"), ("npu", "unknown platform"), ("cpu:x", "bad device index"),
                        (3, "must be a jax.Device")):
        with pytest.raises(ConfigError, match=needle):
            srp_jax.load_factorizer(ckpt, device=bad)
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError, match="no gpu backend"):
            resolve_device("cuda:0")

