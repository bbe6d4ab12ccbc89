"""The fidelity gate: reference verdicts, hand-computed boundaries of every preset, explain()."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srp_jax
from srp_jax.errors import ConfigError
from srp_jax.gate import PRESETS, explain, fidelity_gate

from conftest import load_json, random_dictionary, random_readout_inputs


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_gate_verdicts_match_reference_columns(arch):
    queries = load_json(arch, "margin.json")["queries"]
    exact = np.array([q["margin_from_rows"]["exact"] for q in queries])
    sparse = np.array([q["margin_from_rows"]["sparse"] for q in queries])
    acc = fidelity_gate(exact, sparse, preset="accepted")
    fr = fidelity_gate(exact, sparse, preset="frontier")
    np.testing.assert_array_equal(np.asarray(acc.passed), [q["gate_accepted"] for q in queries])
    np.testing.assert_array_equal(np.asarray(fr.passed), [q["gate_frontier"]["pass"] for q in queries])
    np.testing.assert_allclose(fr.rho, [q["gate_frontier"]["rel"] for q in queries], rtol=1e-5)
    np.testing.assert_allclose(acc.rho, [q["margin_row_stats"]["residual_direct"] for q in queries], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(acc.sign_match), [q["margin_row_stats"]["sign_match"] for q in queries])
    assert 0 < int(np.sum(np.asarray(acc.passed))) < len(queries)  # the fixture exercises both outcomes


def test_presets_by_hand():
    # |eps| = 0.5, s = 1: unfloored rho = 0.5 (fails strict), floor rho = 0.5 (frontier passes, <=)
    assert not bool(fidelity_gate(1.0, 0.5, preset="accepted").passed)
    assert bool(fidelity_gate(1.0, 0.5, preset="frontier").passed)
    assert float(fidelity_gate(1.0, 0.5, preset="plus_delta").rho) == pytest.approx(0.5 / 1.5)
    # tiny exact score: unfloored explodes, the floors hold
    assert float(fidelity_gate(0.1, 0.2, preset="accepted").rho) == pytest.approx(1.0)
    assert float(fidelity_gate(0.1, 0.2, preset="floor", feature_sum=0.2).rho) == pytest.approx(0.2)
    assert float(fidelity_gate(0.1, 0.2, preset="plus_delta").rho) == pytest.approx(0.1 / 0.6)
    assert float(fidelity_gate(0.0, 0.0, preset="accepted").rho) == 0.0
    # sign conventions: zero is "negative" under gt0 but its own sign under np.sign
    assert bool(fidelity_gate(0.0, -0.1, preset="accepted", max_rho=1e9).sign_match)
    assert not bool(fidelity_gate(0.0, -0.1, preset="floor", feature_sum=-0.1).sign_match)
    # floor compares signs against feature_sum, not the base-including reconstruction
    r = fidelity_gate(2.0, 1.8, preset="floor", feature_sum=-0.2)
    assert not bool(r.sign_match) and r.reason_names() == "sign_flip"
    with pytest.raises(ConfigError, match="feature_sum"):
        fidelity_gate(2.0, 1.8, preset="floor")
    # reasons and their order
    assert fidelity_gate(2.0, -1.0).reason_names() == "sign_flip"
    assert fidelity_gate(2.0, 0.5).reason_names() == "residual_share"
    assert fidelity_gate(2.0, 1.9).reason_names() == "ok"
    assert fidelity_gate(0.2, 0.2, min_abs_exact=0.5).reason_names() == "tiny_margin"
    with pytest.raises(ConfigError, match="unknown gate preset"):
        fidelity_gate(1.0, 1.0, preset="nope")
    with pytest.raises(ConfigError, match="rho_form"):
        fidelity_gate(1.0, 1.0, rho_form="weird")
    assert set(PRESETS) == {"accepted", "plus_delta", "floor", "frontier"}


def test_gate_is_elementwise_jittable_and_vmappable():
    s = jnp.array([1.0, -2.0, 0.3, 5.0])
    r = jnp.array([0.9, -0.5, -0.3, 5.1])
    eager = fidelity_gate(s, r)
    jitted = jax.jit(lambda a, b: fidelity_gate(a, b, preset="accepted"))(s, r)
    vmapped = jax.vmap(lambda a, b: fidelity_gate(a, b))(s, r)
    for out in (jitted, vmapped):
        np.testing.assert_array_equal(out.passed, eager.passed)
        np.testing.assert_allclose(out.rho, eager.rho)
    np.testing.assert_array_equal(np.asarray(eager.passed), [True, False, False, True])
    assert list(eager.reason_names()) == ["ok", "residual_share", "sign_flip", "ok"]


def test_explain_explained_and_withheld():
    sae = random_dictionary("topk", seed=5)
    W, H = random_readout_inputs(seed=6)
    # with a huge max_rho only the sign decides: these pairs give both verdicts (4 kept, 2 flipped)
    seen = {"ok": 0, "sign_flip": 0}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]:
        ok = explain(H[0], sae, W_U=W, query_kind="pairwise_margin", target_a=a, target_b=b, max_rho=1e9)
        exact, approx = float((W[a] - W[b]) @ H[0]), ok.scores["approx"]
        assert ok.scores["sign_match"] == ((exact > 0) == (approx > 0))  # the accepted preset's x > 0 rule
        if ok.scores["sign_match"]:
            assert ok.explained and ok.reason == "ok" and ok.features is not None
            mags = [f["abs_contribution"] for f in ok.features]
            assert mags == sorted(mags, reverse=True)
            assert sum(f["contribution"] for f in ok.features) == pytest.approx(ok.scores["feature_sum"], abs=1e-4)
        else:
            assert ok.withheld and ok.reason == "sign_flip" and ok.features is None
        seen[ok.reason] += 1
    assert seen == {"ok": 4, "sign_flip": 2}
    no = explain(H[0], sae, W_U=W, query_kind="pairwise_margin", target_a=1, target_b=2, max_rho=0.0)
    assert no.withheld and no.features is None and no.reason in ("residual_share", "sign_flip")
    assert no.scores["exact"] == pytest.approx(float((W[1] - W[2]) @ H[0]), rel=1e-5)
    assert no.scores["rho"] == pytest.approx(abs(no.scores["residual"]) / max(abs(no.scores["exact"]), 1e-6), rel=1e-5)
    top = explain(H[0], sae, W_U=W, query_kind="pairwise_margin", target_a=1, target_b=2, max_rho=1e9, top_features=2)
    assert top.explained and len(top.features) == 2
    win = explain(H[1], sae, W_U=W, query_kind="winner_vs_topk", top_competitors=3, max_rho=1e9)
    assert win.query["target_token_id"] == int(np.argmax(W @ H[1]))
    assert srp_jax.explain is explain


def test_explain_verdict_agrees_with_fidelity_gate():
    sae = random_dictionary("gated", seed=2)
    W, H = random_readout_inputs(seed=9)
    for i in range(len(H)):
        e = explain(H[i], sae, W_U=W, query_kind="winner_vs_rank", competitor_rank=2)
        g = fidelity_gate(e.scores["exact"], e.scores["approx"])
        assert e.explained == bool(g.passed)


def test_gate_input_errors_are_named():
    from srp_jax.errors import ConfigError, ShapeError

    with pytest.raises(ShapeError, match=r"s_exact has shape \(3,\) but s_recon has \(2,\)"):
        fidelity_gate(np.ones(3), np.ones(2))
    with pytest.raises(ShapeError, match="feature_sum"):
        fidelity_gate(np.ones(3), np.ones(3), np.ones(2), preset="floor")
    with pytest.raises(ConfigError, match="feature_sum="):
        fidelity_gate(1.0, 1.0, preset="floor")
    with pytest.raises(ConfigError, match=r"unknown gate rule field\(s\) foo"):
        fidelity_gate(1.0, 1.0, foo=1)
    with pytest.raises(ConfigError, match="unknown gate preset"):
        fidelity_gate(1.0, 1.0, preset="lenient")

