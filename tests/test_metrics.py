"""Tests for srp_jax.metrics: reference parity, independent NumPy expectations, constructions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import srp_jax
from srp_jax import metrics as M
from srp_jax.config import FactorizerConfig
from srp_jax.dictionary import Dictionary
from srp_jax.errors import ConfigError, NonFiniteError, ShapeError, SrpError

FIX = Path(__file__).parent / "fixtures" / "reference" / "topk"
READOUT_KEYS = ("W_U", "row_mean", "row_norms", "rows_normalized")


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def ref():
    data = np.load(FIX / "eval_dataset.npz")
    return {
        "data": {key: data[key] for key in data.files},
        "metrics": json.loads((FIX / "eval_metrics.json").read_text()),
        "config": json.loads((FIX / "eval_config.json").read_text()),
        "dictionary": srp_jax.load_factorizer(FIX / "checkpoint.pt"),
    }


def make_dictionary(E, b, Dec, k):
    """A TopK Dictionary from NumPy encoder kernel (d, D), bias (D,), decoder (D, d)."""
    d, D = E.shape
    cfg = FactorizerConfig(architecture="topk", d_features=D, k=k)
    params = {
        "encoder": {"kernel": jnp.asarray(E, jnp.float32), "bias": jnp.asarray(b, jnp.float32)},
        "decoder": jnp.asarray(Dec, jnp.float32),
    }
    return Dictionary(config=cfg, params=params, buffers={}, d_model=d)


def make_readout(W):
    """Readout arrays (float32) with the 1e-8 norm clamp, computed here in NumPy."""
    W = np.asarray(W, np.float32)
    mu = W.mean(axis=0)
    c = W - mu
    a = np.maximum(np.linalg.norm(c, axis=1), 1e-8).astype(np.float32)
    return {"W_U": W, "row_mean": mu, "row_norms": a, "rows_normalized": (c / a[:, None]).astype(np.float32)}


def identity_dictionary(d):
    """Exact reconstruction: features ±e_i, code = (relu(x), relu(-x)), k = d keeps every nonzero."""
    eye = np.eye(d, dtype=np.float32)
    return make_dictionary(np.concatenate([eye, -eye], axis=1), np.zeros(2 * d), np.concatenate([eye, -eye], 0), d)


def random_problem(seed=0, V=80, d=12, D=40, k=5, N=24):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(V, d)).astype(np.float32)
    E = (rng.normal(size=(d, D)) * 0.5).astype(np.float32)
    b = (rng.normal(size=D) * 0.05).astype(np.float32)
    Dec = rng.normal(size=(D, d)).astype(np.float32)
    Dec /= np.linalg.norm(Dec, axis=1, keepdims=True)
    H = (rng.normal(size=(N, d)) * 2.0).astype(np.float32)
    return W, E, b, Dec, k, H


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_expected(W, E, b, Dec, k, H, *, n_rows=None, C=8, ov=5, cap=None):
    """A float64 NumPy re-implementation of the metric definitions (method.md §5)."""
    W = W.astype(np.float64)
    V = W.shape[0] if n_rows is None else n_rows
    ro = make_readout(W.astype(np.float32))
    X = ro["rows_normalized"][:V].astype(np.float64)
    A = ro["row_norms"][:V].astype(np.float64)
    mu = ro["row_mean"].astype(np.float64)
    W = W[:V]

    def enc(x):
        z = np.maximum(x @ E.astype(np.float64) + b, 0.0)
        out = np.zeros_like(z)
        idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
        np.put_along_axis(out, idx, np.take_along_axis(z, idx, 1), 1)
        return out

    code = enc(X)
    recon = code @ Dec
    recon_W = mu + A[:, None] * recon
    lo, lr = H @ W.T, H @ recon_W.T
    capf = (lambda z: z) if cap is None else (lambda z: cap * np.tanh(z / cap))
    lp, lq = np_log_softmax(capf(lo)), np_log_softmax(capf(lr))
    kl = (np.exp(lp) * (lp - lq)).sum(1) / math.log(2)
    t = lo.argmax(1)
    kk = min(ov, V)
    top_o = np.argsort(-capf(lo), 1)[:, :kk]
    top_r = np.argsort(-capf(lr), 1)[:, :kk]
    overlap = np.mean([len(set(a) & set(c)) / kk for a, c in zip(top_o, top_r)])
    rows = np.arange(len(H))
    resid = np.abs(lo[rows, t] - lr[rows, t])
    contrib = A[t][:, None] * enc(X[t]) * (H @ Dec.T)
    cc = min(C, contrib.shape[1])

    def cov(v):
        tot = v.sum(1)
        top = -np.sort(-v, 1)[:, :cc].sum(1)
        return np.where(tot > 1e-12, top / np.where(tot > 1e-12, tot, 1), 1.0).mean()

    masked = lo.copy()
    masked[rows, t] = -np.inf
    t2 = masked.argmax(1)
    m_e, m_s = lo[rows, t] - lo[rows, t2], lr[rows, t] - lr[rows, t2]
    rel = np.abs(m_e - m_s) / np.maximum(np.abs(m_e), 0.5)
    usage = (code > 0).sum(0)
    return {
        "row_centered_ev": 1 - ((X - recon) ** 2).sum() / max((X**2).sum(), 1e-12),
        "row_centered_cosine": np.mean((X * recon).sum(1) / (np.linalg.norm(X, axis=1) * np.maximum(np.linalg.norm(recon, axis=1), 1e-8))),
        "val_logit_kl_bits_mean": kl.mean(),
        "kl_bits_p90": np.percentile(kl, 90),
        "val_top1_match": np.mean(capf(lo).argmax(1) == capf(lr).argmax(1)),
        f"val_top{ov}_overlap": overlap,
        "top1_logit_residual_abs_mean": resid.mean(),
        "top1_logit_residual_frac_mean": (resid / np.maximum(np.abs(lo[rows, t]), 1e-6)).mean(),
        f"top{C}_positive_contrib_coverage_mean": cov(np.maximum(contrib, 0)),
        f"top{C}_abs_contrib_coverage_mean": cov(np.abs(contrib)),
        "dead_feature_rate": np.mean(usage == 0),
        "mean_l0": (code > 0).sum(1).mean(),
        "frontier_pass_at_0.5": np.mean(((m_e > 0) == (m_s > 0)) & (rel <= 0.5)),
    }


# ---------------------------------------------------------------------------------------------
# reference fixture parity


def test_reference_fixture_every_key(ref):
    data, want = ref["data"], ref["metrics"]["metrics"]
    readout = {key: data[key] for key in READOUT_KEYS}
    got = M.evaluate(ref["dictionary"], readout, data["hidden_val"], evaluation=ref["config"]["evaluation"])
    assert set(got) == set(want)
    for key, expected in want.items():
        value = got[key]
        if isinstance(expected, bool):
            assert value is expected, key
        elif isinstance(expected, int):
            assert isinstance(value, int) and not isinstance(value, bool) and value == expected, key
        else:
            assert isinstance(value, float), key
            # acceptance is 1e-4; measured worst: identity_abs_error_max 1.9e-6 (itself round-off)
            assert abs(value - expected) <= 1e-5, (key, value, expected)
    # the fixture's independent cross-checks
    pos, absc = ref["metrics"]["contribution_coverages_recomputed"]
    assert abs(got["top8_positive_contrib_coverage_mean"] - pos) <= 1e-6
    assert abs(got["top8_abs_contrib_coverage_mean"] - absc) <= 1e-6
    assert abs(got["selection_score"] - ref["metrics"]["selection_score_recomputed"]) <= 1e-6
    assert got["duplicate_decoder_frac"] == ref["metrics"]["duplicate_decoder_frac_recomputed"]
    json.dumps(got, allow_nan=False)  # JSON-safe Python scalars


def test_reference_defaults_to_checkpoint_evaluation_and_readout_object(ref):
    """evaluation=None uses the dictionary's stored block ({k: 16}); a Readout object works."""
    from srp_jax.readout import Readout

    data = ref["data"]
    ro = Readout.from_weights(data["W_U"])
    np.testing.assert_allclose(np.asarray(ro.rows_normalized), data["rows_normalized"], atol=1e-6)
    got = M.evaluate(ref["dictionary"], ro, data["hidden_val"])
    want = ref["metrics"]["metrics"]
    assert got["k"] == 16 and got["eval_hidden"] == 96
    for key in ("row_centered_ev", "val_logit_kl_bits_mean", "val_top1_match", "selection_score"):
        assert abs(got[key] - want[key]) <= 1e-4


def test_full_mode_equals_reference_when_rows_cover_vocab(ref):
    data = ref["data"]
    readout = {key: data[key] for key in READOUT_KEYS}
    ev = ref["config"]["evaluation"]
    r = M.evaluate(ref["dictionary"], readout, data["hidden_val"], evaluation=ev)
    f = M.evaluate(ref["dictionary"], readout, data["hidden_val"], evaluation=ev, mode="full")
    assert f["eval_mode"] == "full" and f["softcap"] is None
    assert {"kl_bits_p90", "frontier_pass_at_0.5", "frontier_sign_agreement"} <= set(f)
    for key, value in r.items():
        if isinstance(value, bool) or isinstance(value, int):
            assert f[key] == value, key
        else:
            assert abs(f[key] - value) <= 1e-5, (key, f[key], value)  # dtype-level differences only


def test_max_eval_rows_truncates_vocabulary():
    W, E, b, Dec, k, H = random_problem(seed=3)
    dic = make_dictionary(E, b, Dec, k)
    got = M.evaluate(dic, make_readout(W), H, evaluation={"max_eval_rows": 37, "k": k})
    assert got["eval_rows"] == 37
    # the readout is preprocessed on all 80 rows; only the first 37 are the vocabulary
    ro = make_readout(W)
    exp = np_expected(W, E, b, Dec, k, H, n_rows=37)
    assert abs(got["row_centered_ev"] - exp["row_centered_ev"]) < 1e-5
    assert abs(got["val_logit_kl_bits_mean"] - exp["val_logit_kl_bits_mean"]) < 1e-4
    assert got["val_top1_match"] == pytest.approx(exp["val_top1_match"], abs=1e-6)
    # full mode ignores max_eval_rows
    full = M.evaluate(dic, ro, H, evaluation={"max_eval_rows": 37, "k": k}, mode="full")
    assert full["eval_rows"] == 80


# ---------------------------------------------------------------------------------------------
# independent NumPy float64 expectations


@pytest.mark.parametrize("mode", ["reference", "full"])
def test_evaluate_matches_numpy_reimplementation(mode):
    W, E, b, Dec, k, H = random_problem(seed=1)
    dic = make_dictionary(E, b, Dec, k)
    got = M.evaluate(dic, make_readout(W), H, evaluation={"k": k}, mode=mode)
    exp = np_expected(W, E, b, Dec, k, H)
    for key, value in exp.items():
        if key in ("kl_bits_p90", "frontier_pass_at_0.5") and mode == "reference":
            assert key not in got
            continue
        assert abs(got[key] - value) <= 1e-4, (key, got[key], value)
    assert got["k"] == k and got["eval_rows"] == W.shape[0] and got["eval_hidden"] == H.shape[0]


def test_chunk_sizes_do_not_change_results():
    W, E, b, Dec, k, H = random_problem(seed=2)
    dic = make_dictionary(E, b, Dec, k)
    ro = make_readout(W)
    a = M.evaluate(dic, ro, H, evaluation={"k": k})
    c = M.evaluate(dic, ro, H, evaluation={"k": k}, row_batch=9, hidden_batch=5)
    for key in a:
        assert a[key] == pytest.approx(c[key], rel=1e-6, abs=1e-6), key


def test_building_blocks_against_numpy():
    rng = np.random.default_rng(5)
    P = rng.normal(size=(6, 30)) * 3
    Q = P + rng.normal(size=(6, 30))
    lp, lq = np_log_softmax(P), np_log_softmax(Q)
    kl = (np.exp(lp) * (lp - lq)).sum(1) / math.log(2)
    np.testing.assert_allclose(np.asarray(M.kl_bits(jnp.asarray(P, jnp.float32), jnp.asarray(Q, jnp.float32))), kl, rtol=1e-4, atol=1e-5)
    assert float(M.kl_bits(jnp.asarray(P), jnp.asarray(P)).max()) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(np.asarray(M.top1_match(jnp.asarray(P), jnp.asarray(Q))), P.argmax(1) == Q.argmax(1))
    ov = [len(set(np.argsort(-p)[:4]) & set(np.argsort(-q)[:4])) / 4 for p, q in zip(P, Q)]
    np.testing.assert_allclose(np.asarray(M.topk_overlap(jnp.asarray(P), jnp.asarray(Q), 4)), ov)
    assert np.all(np.asarray(M.topk_overlap(jnp.asarray(P), jnp.asarray(P), 50)) == 1.0)  # k clipped to V
    x = rng.normal(size=(10, 4))
    xh = x + 0.3 * rng.normal(size=(10, 4))
    ev = 1 - ((x - xh) ** 2).sum() / (x**2).sum()
    assert float(M.row_centered_ev(jnp.asarray(x), jnp.asarray(xh))) == pytest.approx(ev, rel=1e-5)
    # ties: the first maximal index wins
    tie = jnp.asarray([[1.0, 3.0, 3.0]])
    assert bool(M.top1_match(tie, jnp.asarray([[0.0, 2.0, 1.0]]))[0])


def test_contribution_coverage_hand_values():
    contrib = jnp.asarray([[3.0, -1.0, 1.0, 0.0], [-2.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    pos, absc = M.contribution_coverage(contrib, 1)
    np.testing.assert_allclose(np.asarray(pos), [3 / 4, 1.0, 1.0])  # no positive mass -> 1
    np.testing.assert_allclose(np.asarray(absc), [3 / 5, 2 / 3, 1.0])
    pos, absc = M.contribution_coverage(contrib, 10)  # clipped to D: full coverage
    np.testing.assert_allclose(np.asarray(absc), [1.0, 1.0, 1.0])


def test_cosine_matches_torch_semantics():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = rng.normal(size=(5, 3)).astype(np.float32)
    y[1] = 0.0
    y[2] = 1e-9
    want = torch.nn.functional.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y), dim=1, eps=1e-8).numpy()
    np.testing.assert_allclose(np.asarray(M.row_cosine(jnp.asarray(x), jnp.asarray(y))), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# constructions


@pytest.mark.parametrize("mode", ["reference", "full"])
def test_exact_dictionary_is_perfect(mode):
    d = 8
    rng = np.random.default_rng(4)
    W = rng.normal(size=(40, d)).astype(np.float32)
    H = rng.normal(size=(12, d)).astype(np.float32) * 3
    dic = identity_dictionary(d)
    m = M.evaluate(dic, make_readout(W), H, evaluation={"contribution_top_k": 2}, mode=mode)
    assert m["k"] == d
    assert m["row_centered_ev"] == pytest.approx(1.0, abs=1e-6)
    assert m["row_centered_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["val_logit_kl_bits_mean"] == pytest.approx(0.0, abs=1e-5)
    assert m["val_top1_match"] == 1.0 and m["val_top5_overlap"] == 1.0
    assert m["top1_logit_residual_abs_mean"] < 1e-4
    assert m["identity_abs_error_max"] < 1e-4
    assert m["mean_l0"] == d and m["l0_p10"] == d and m["l0_p90"] == d
    assert "top2_abs_contrib_coverage_mean" in m and "top8_abs_contrib_coverage_mean" not in m
    if mode == "full":
        assert m["frontier_pass_at_0.5"] == 1.0 and m["kl_bits_p90"] == pytest.approx(0.0, abs=1e-5)


def test_softcap_changes_kl_not_top1_or_rowev():
    W, E, b, Dec, k, H = random_problem(seed=6)
    dic = make_dictionary(E, b, Dec, k)
    ro = make_readout(W)
    plain = M.evaluate(dic, ro, H, evaluation={"k": k}, mode="full")
    capped = M.evaluate(dic, ro, H, evaluation={"k": k}, mode="full", softcap=10.0)
    assert capped["softcap"] == 10.0
    assert abs(capped["val_logit_kl_bits_mean"] - plain["val_logit_kl_bits_mean"]) > 1e-3
    exp = np_expected(W, E, b, Dec, k, H, cap=10.0)
    assert capped["val_logit_kl_bits_mean"] == pytest.approx(exp["val_logit_kl_bits_mean"], abs=1e-4)
    for key in ("val_top1_match", "row_centered_ev", "frontier_pass_at_0.5", "top1_logit_residual_abs_mean"):
        assert capped[key] == pytest.approx(plain[key], abs=1e-9), key
    # a readout's softcap is used in full mode and ignored by the reference mode
    ro_cap = {**ro, "softcap": 10.0}
    assert M.evaluate(dic, ro_cap, H, evaluation={"k": k}, mode="full")["val_logit_kl_bits_mean"] == pytest.approx(
        capped["val_logit_kl_bits_mean"], abs=1e-9
    )
    ref_mode = M.evaluate(dic, ro_cap, H, evaluation={"k": k})
    assert ref_mode["val_logit_kl_bits_mean"] == pytest.approx(plain["val_logit_kl_bits_mean"], abs=1e-4)
    # a huge cap is the identity
    huge = M.evaluate(dic, ro, H, evaluation={"k": k}, mode="full", softcap=1e7)
    assert huge["val_logit_kl_bits_mean"] == pytest.approx(plain["val_logit_kl_bits_mean"], abs=1e-4)


def test_frontier_by_construction():
    """Hand-built margins: readout rows give logits (3, 1, 0) for h = e0 direction."""
    # V = 3 rows in d = 2; h = (1, 0) -> logits = first coordinate
    W = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    H = np.array([[1.0, 0.0]], np.float32)
    # dictionary with a single feature: reconstruction of every row = projection on it
    for direction, expect in (((1.0, 0.0), None), ((0.0, 1.0), None)):
        Dec = np.array([direction], np.float32)
        dic = make_dictionary(Dec.T.copy(), np.zeros(1), Dec, 1)
        ro = make_readout(W)
        got = M.evaluate(dic, ro, H, mode="full")
        lo = H @ W.T
        X, A, mu = (ro[key].astype(np.float64) for key in ("rows_normalized", "row_norms", "row_mean"))
        code = np.maximum(X @ Dec.T.astype(np.float64), 0)
        lr = H @ (mu + A[:, None] * (code @ Dec)).T
        m_e, m_s = lo[0, 0] - lo[0, 1], lr[0, 0] - lr[0, 1]
        passed = ((m_e > 0) == (m_s > 0)) and abs(m_e - m_s) / max(abs(m_e), 0.5) <= 0.5
        assert got["frontier_pass_at_0.5"] == float(passed)
        assert got["frontier_sign_agreement"] == float((m_e > 0) == (m_s > 0))


def test_dead_rare_always_on_by_construction():
    d, V = 4, 50
    rng = np.random.default_rng(7)
    W = rng.normal(size=(V, d)).astype(np.float32)
    # features: 0 always on (bias 10), 1 dead (bias -10), 2..5 = ±e0, ±e1 (fire on about half)
    E = np.zeros((d, 6), np.float32)
    b = np.array([10.0, -10.0, 0, 0, 0, 0], np.float32)
    E[0, 2], E[0, 3], E[1, 4], E[1, 5] = 1, -1, 1, -1
    Dec = np.zeros((6, d), np.float32)
    Dec[:, 0] = 1.0
    Dec[1] = [0, 1, 0, 0]
    Dec[2:, 2] = [1, 2, 3, 4]
    dic = make_dictionary(E, b, Dec, 6)
    ro = make_readout(W)
    m = M.evaluate(dic, ro, rng.normal(size=(5, d)).astype(np.float32))
    X = ro["rows_normalized"]
    usage = np.array([V, 0, (X[:, 0] > 0).sum(), (X[:, 0] < 0).sum(), (X[:, 1] > 0).sum(), (X[:, 1] < 0).sum()])
    assert m["dead_feature_rate"] == pytest.approx(1 / 6)
    assert m["rare_feature_rate"] == pytest.approx(1 / 6)
    assert m["always_on_feature_rate"] == pytest.approx((1 + np.sum(usage[2:] > V / 2)) / 6)
    p = usage / usage.sum()
    nz = p[p > 0]
    assert m["feature_usage_entropy"] == pytest.approx(-(nz * np.log(nz)).sum() / math.log(6), abs=1e-12)
    per_row = 1 + (X[:, 0] != 0) + (X[:, 1] != 0)
    assert m["mean_l0"] == pytest.approx(per_row.mean())


def test_usage_stats_hand_values():
    s = M.usage_stats([0, 1, 500, 1000], [1, 2, 3, 4], n_rows=1000, d_features=4)
    assert s["dead_feature_rate"] == 0.25
    assert s["rare_feature_rate"] == 0.25  # 1/1000 is not < 1e-3; 0 is
    assert s["always_on_feature_rate"] == 0.25  # 500/1000 is not > 0.5
    assert s["mean_l0"] == 2.5 and s["l0_p50"] == 2.5
    assert s["l0_p10"] == pytest.approx(1.3) and s["l0_p90"] == pytest.approx(3.7)
    empty = M.usage_stats([0, 0], [], n_rows=0)
    assert empty["feature_usage_entropy"] == 0.0 and math.isnan(empty["l0_p50"]) and math.isnan(empty["mean_l0"])
    # uniform usage has entropy 1 (normalised by log D)
    assert M.usage_stats([5, 5, 5, 5], [1])["feature_usage_entropy"] == pytest.approx(1.0)


def test_duplicate_decoder_frac_by_construction():
    e = np.eye(6, dtype=np.float32)
    dec = np.stack(
        [
            e[0], 2 * e[0],            # exact duplicates (cos 1)
            e[1], e[1] + 0.3 * e[2],   # cos = 1/sqrt(1.09) ≈ 0.958 >= 0.9
            e[3], -e[3],               # cos -1: not duplicates
            e[4], e[4] + 0.6 * e[5],   # cos ≈ 0.857 < 0.9
            np.zeros(6, np.float32),   # zero row (clamped norm): cos 0 with everything
        ]
    )  # fmt: skip
    for chunk in (1, 2, 4, 9, 4096):
        assert M.duplicate_decoder_frac(dec, chunk=chunk) == pytest.approx(4 / 9)
    assert M.duplicate_decoder_frac(dec[:1]) == 0.0
    assert M.duplicate_decoder_frac(np.stack([e[0], e[0]])) == 1.0


def test_quantile_rule_matches_numpy_and_torch():
    rng = np.random.default_rng(11)
    for n in (1, 2, 5, 17, 100):
        v = rng.integers(0, 30, size=n).astype(np.float64)
        for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            assert M.quantile_linear(v, q) == pytest.approx(np.quantile(v, q, method="linear"), abs=1e-12)
    assert math.isnan(M.quantile_linear([], 0.5))
    torch = pytest.importorskip("torch")
    v = rng.normal(size=33)
    for q in (0.1, 0.5, 0.9):
        assert M.quantile_linear(v, q) == torch.quantile(torch.tensor(v, dtype=torch.float64), q).item()


# ---------------------------------------------------------------------------------------------
# selection score, correlations


def _good_metrics():
    return {
        "k": 16, "contribution_top_k": 8, "topk_overlap": 5, "finite_metrics": True,
        "row_centered_ev": 0.8, "row_centered_cosine": 0.9, "top8_abs_contrib_coverage_mean": 0.5,
        "top8_positive_contrib_coverage_mean": 0.6, "val_top1_match": 0.7, "val_top5_overlap": 0.4,
        "top1_logit_residual_frac_mean": 0.1, "val_logit_kl_bits_mean": 2.0, "dead_feature_rate": 0.25,
        "identity_abs_error_max": 1e-5,
    }  # fmt: skip


def test_selection_score_formula_and_gates():
    m = _good_metrics()
    want = 1.5 * 0.8 + 0.5 * 0.9 + 0.7 * 0.5 + 0.4 * 0.6 + 0.5 * 0.7 + 0.3 * 0.4 - 0.8 * 0.1 - 0.03 * 2.0 - 0.2 * 0.25
    assert M.selection_score(m) == pytest.approx(want, abs=1e-12)
    assert M.selection_score({**m, "mean_l0": float("nan")}) == -1e9
    assert M.selection_score({**m, "row_centered_ev": float("inf")}) == -1e9
    assert M.selection_score({**m, "dead_feature_rate": 0.99}) == pytest.approx(-1e6 + 0.01)
    # paper configs: max dead 0.5, given directly or as a config block
    assert M.selection_score({**m, "dead_feature_rate": 0.6}) > -1
    assert M.selection_score({**m, "dead_feature_rate": 0.6}, {"max_dead_feature_rate": 0.5}) == pytest.approx(-1e6 + 0.4)
    cfg = {"autoresearch": {"score_thresholds": {"max_dead_feature_rate": 0.5}}}
    assert M.selection_score({**m, "dead_feature_rate": 0.6}, cfg) == pytest.approx(-1e6 + 0.4)
    assert M.selection_score({**m, "val_logit_kl_bits_mean": 25.0}) == pytest.approx(-1e5 - 25.0)
    assert M.selection_score({**m, "val_logit_kl_bits_mean": 25.0}, {"max_val_logit_kl_bits_mean": 30}) > -1e3
    assert M.selection_score({**m, "identity_abs_error_max": 2e-3}) == pytest.approx(-1e5 - 2e-3)
    assert M.selection_score({**m, "identity_abs_error_max": 1e-3}) > -1e3  # gate is strict >
    # widths in key names follow the metrics' own contribution_top_k / topk_overlap
    m4 = {key.replace("top8", "top4").replace("top5", "top3"): v for key, v in m.items()}
    m4.update(contribution_top_k=4, topk_overlap=3)
    assert M.selection_score(m4) == pytest.approx(want, abs=1e-12)
    # gates on missing keys: no dead rate -> treated as 1.0 (dead)
    assert M.selection_score({"row_centered_ev": 1.0}) == pytest.approx(-1e6)


def test_nan_metrics_mark_not_finite_and_jsonable():
    m = M.metrics_to_jsonable({"a": float("nan"), "b": np.float64(2.0), "c": 3})
    assert m == {"a": None, "b": 2.0, "c": 3}


def test_pearson_spearman_rules():
    assert math.isnan(M.pearson([1, 2], [2, 3]))
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    x = np.array([1.0, 2.0, 4.0, 8.0, 3.0])
    assert M.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.pearson(x, -x) == pytest.approx(-1.0)
    assert M.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert math.isnan(M.spearman([1, 2], [1, 2]))
    # ordinal ranks: ties are ranked by position, not averaged
    a, c = [1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    assert M.spearman(a, c) == pytest.approx(1.0)  # ranks (0, 1, 2, 3) for both
    avg = np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    assert avg < 0.99 and M.spearman(a, c) != pytest.approx(avg)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    W, E, b, Dec, k, H = random_problem(seed=8, V=20, N=4)
    dic = make_dictionary(E, b, Dec, k)
    ro = make_readout(W)
    with pytest.raises(ConfigError, match="mode"):
        M.evaluate(dic, ro, H, mode="fast")
    with pytest.raises(ConfigError, match="softcap"):
        M.evaluate(dic, ro, H, softcap=30.0)
    with pytest.raises(ConfigError, match="softcap"):
        M.evaluate(dic, ro, H, mode="full", softcap=-1.0)
    with pytest.raises(ConfigError, match="rows_normalized"):
        M.evaluate(dic, {key: ro[key] for key in ("W_U", "row_mean", "row_norms")}, H)
    with pytest.raises(ShapeError, match="hidden"):
        M.evaluate(dic, ro, H[:, :5])
    with pytest.raises(ShapeError, match="row_norms"):
        M.evaluate(dic, {**ro, "row_norms": ro["row_norms"][:5]}, H)
    with pytest.raises(NonFiniteError):
        M.evaluate(dic, ro, np.where(np.arange(H.size).reshape(H.shape) == 0, np.nan, H))
    with pytest.raises(SrpError):
        M.evaluate(dic, ro, H, evaluation={"bogus_but_ignored": 1, "topk_overlap": "x"})


# ---------------------------------------------------------------------------------------------
# a second architecture against reference outputs, reconstruct_rows, readiness


def test_gated_reference_codes_give_same_metrics():
    """Gated fixture: metrics over the first 64 rows equal those recomputed from the reference's
    own codes / reconstructions (encode.npz), independently of our encoder."""
    g = FIX.parent / "gated"
    enc, inp, pre = (np.load(g / name) for name in ("encode.npz", "inputs.npz", "preprocess.npz"))
    assert np.array_equal(enc["row_ids"], np.arange(64))
    dic = srp_jax.load_factorizer(g / "checkpoint.pt")
    readout = {"W_U": inp["W_U"], "row_mean": pre["row_mean"], "row_norms": pre["row_norms"],
               "rows_normalized": pre["rows_normalized"]}  # fmt: skip
    H = inp["H_heldout"]
    got = M.evaluate(dic, readout, H, evaluation={"max_eval_rows": 64})
    x = pre["rows_normalized_f64"][:64]
    xh = enc["decoded_k_used_f64"]
    code = enc["code_k_used_f64"]
    assert got["eval_rows"] == 64 and got["k"] == dic.k
    assert got["row_centered_ev"] == pytest.approx(1 - ((x - xh) ** 2).sum() / (x**2).sum(), abs=1e-5)
    l0 = (code > 0).sum(1)
    assert got["mean_l0"] == pytest.approx(l0.mean(), abs=1e-12)
    for q, key in ((0.1, "l0_p10"), (0.5, "l0_p50"), (0.9, "l0_p90")):
        assert got[key] == pytest.approx(np.quantile(l0, q), abs=1e-12)
    usage = (code > 0).sum(0)
    assert got["dead_feature_rate"] == pytest.approx(np.mean(usage == 0), abs=1e-12)
    recon_W = pre["row_mean_f64"] + pre["row_norms_f64"][:64, None] * xh
    lo, lr = H.astype(np.float64) @ inp["W_U"][:64].T.astype(np.float64), H @ recon_W.T
    lp, lq = np_log_softmax(lo), np_log_softmax(lr)
    kl = ((np.exp(lp) * (lp - lq)).sum(1) / math.log(2)).mean()
    assert got["val_logit_kl_bits_mean"] == pytest.approx(kl, abs=1e-4)
    assert got["val_top1_match"] == pytest.approx(np.mean(lo.argmax(1) == lr.argmax(1)), abs=1e-6)


def test_reconstruct_rows_identity_dictionary():
    d = 8
    rng = np.random.default_rng(12)
    ro = make_readout(rng.normal(size=(30, d)))
    recon_x, recon_W, usage, l0 = M.reconstruct_rows(
        identity_dictionary(d), ro["rows_normalized"], ro["row_mean"], ro["row_norms"], row_batch=7
    )
    np.testing.assert_allclose(np.asarray(recon_x), ro["rows_normalized"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(recon_W), ro["W_U"], atol=1e-5)
    X = ro["rows_normalized"]
    np.testing.assert_array_equal(usage, np.concatenate([(X > 0).sum(0), (X < 0).sum(0)]).astype(np.float64))
    assert usage.dtype == np.float64 and l0.dtype == np.int64
    np.testing.assert_array_equal(l0, (X != 0).sum(1))


def test_batch_topk_without_threshold_refuses():
    import jax

    from srp_jax.errors import ThresholdNotReadyError
    from srp_jax.factorizers import init_factorizer

    cfg = FactorizerConfig(architecture="batch_topk", d_features=16, k=4)
    params, buffers = init_factorizer(jax.random.PRNGKey(0), cfg, 8)
    dic = Dictionary(config=cfg, params=params, buffers=buffers, d_model=8)
    rng = np.random.default_rng(0)
    with pytest.raises(ThresholdNotReadyError):
        M.evaluate(dic, make_readout(rng.normal(size=(10, 8))), rng.normal(size=(3, 8)).astype(np.float32))


def test_diverged_dictionary_gets_metrics_flagged_not_a_crash(tmp_path):
    """A decoder row of NaN (a diverged run): load_factorizer warns, evaluate still returns
    every key with finite_metrics False and selection_score -1e9 (the reference's sentinel)."""
    W, E, b, Dec, k, H = random_problem(seed=5)
    Dec = Dec.copy()
    Dec[3] = np.nan
    ckpt = {
        "factorizer": {"architecture": "topk", "d_features": Dec.shape[0], "k": k},
        "model_state_dict": {"encoder.weight": E.T.copy(), "encoder.bias": b, "decoder": Dec},
    }
    with pytest.warns(RuntimeWarning, match=r"non-finite values in \['params'\]\['decoder'\] \(12\)"):
        dic = srp_jax.load_factorizer(ckpt)
    m = M.evaluate(dic, make_readout(W), H, evaluation={"k": k})
    assert m["finite_metrics"] is False and m["selection_score"] == -1e9
    assert math.isnan(m["row_centered_ev"])
    healthy = M.evaluate(make_dictionary(E, b, np.nan_to_num(Dec), k), make_readout(W), H, evaluation={"k": k})
    assert healthy["finite_metrics"] is True and healthy["selection_score"] > -1e9
    with pytest.raises(NonFiniteError, match="decoder"):
        M.duplicate_decoder_frac(Dec)  # the public helper still refuses NaN unless asked
    assert M.duplicate_decoder_frac(Dec, check_finite=False) == M.duplicate_decoder_frac(
        np.delete(Dec, 3, axis=0)) * (Dec.shape[0] - 1) / Dec.shape[0]
