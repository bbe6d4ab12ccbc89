"""Each training term against an independent expectation (small shapes)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from srp_jax import factorizers as F
from srp_jax.config import FactorizerConfig, TrainingConfig
from srp_jax.train.sampling import cdf_thresholds, draw_rows, rows_from_bits, sample_rows_inverse_cdf
from srp_jax.train.schedules import learning_rate, prism_weight
from srp_jax.train.state import init_train_state
from srp_jax.train.step import (
    StepSpec,
    TrainData,
    auxk_loss,
    controller_update,
    make_optimizer,
    sample_row_indices,
    selected_prism_loss,
    train_step_jit,
)


def _dataset(V=48, d=8, N=20, seed=0):
    from types import SimpleNamespace

    from srp_jax.data import compute_top_targets
    from srp_jax.readout import preprocess_rows

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, d)).astype(np.float32)
    H = rng.standard_normal((N, d)).astype(np.float32)
    mu, a, x = (np.asarray(t) for t in preprocess_rows(W))
    targets, counts = compute_top_targets(W, H)
    return SimpleNamespace(W_U=W, rows_normalized=x, row_mean=mu, row_norms=a, hidden_train=H,
                           top_targets=targets, top_counts=counts, d_model=d, vocab_size=V)


def test_lr_schedule_breakpoints():
    c = TrainingConfig(steps=100, lr=1e-3)
    assert float(learning_rate(c, 1)) == pytest.approx(1e-3) and float(learning_rate(c, 100)) == pytest.approx(1e-3)
    w = TrainingConfig(steps=100, lr=1e-3, lr_schedule="warmup_cosine", lr_warmup_steps=10, final_lr_frac=0.1)
    assert float(learning_rate(w, 1)) == pytest.approx(1e-4)
    assert float(learning_rate(w, 5)) == pytest.approx(5e-4)
    assert float(learning_rate(w, 10)) == pytest.approx(1e-3)
    assert float(learning_rate(w, 55)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)  # half way: cos(pi/2)=0
    assert float(learning_rate(w, 100)) == pytest.approx(1e-4, rel=1e-5)
    d = TrainingConfig(steps=200, lr_schedule="warmup_cosine")
    assert d.warmup_steps == 10 and float(learning_rate(d, 10)) == pytest.approx(1e-3)
    # the optax schedule sees 0-based update counts
    from srp_jax.train.schedules import optax_lr_schedule

    assert float(optax_lr_schedule(w)(0)) == pytest.approx(float(learning_rate(w, 1)))


def test_lambda_schedule_breakpoints():
    c = TrainingConfig(steps=100, lambda_prism=0.01)
    assert float(prism_weight(c, 1)) == pytest.approx(0.01)
    r = TrainingConfig(steps=100, lambda_prism=1e-3, lambda_mode="delayed_ramp", lambda_ramp_start_frac=0.7)
    assert float(prism_weight(r, 1)) == 0.0 and float(prism_weight(r, 69)) == 0.0
    assert float(prism_weight(r, 70)) == 0.0
    assert float(prism_weight(r, 85)) == pytest.approx(0.5e-3, rel=1e-5)
    assert float(prism_weight(r, 100)) == pytest.approx(1e-3, rel=1e-6)


def test_row_sampling_frequencies_by_counting():
    w = np.array([0.5, 0.25, 0.125, 0.125, 0.0 + 1e-12])
    w = w / w.sum()
    idx = np.asarray(sample_row_indices(jax.random.PRNGKey(0), jnp.log(jnp.asarray(w, jnp.float32)), 200_000))
    freq = np.bincount(idx, minlength=5) / idx.size
    np.testing.assert_allclose(freq, w, atol=0.004)
    # with replacement: a batch larger than V works and repeats rows
    assert np.asarray(sample_row_indices(jax.random.PRNGKey(1), jnp.zeros(3), 10)).shape == (10,)


def test_cdf_thresholds_by_hand_and_bad_weights():
    s = 2**31
    np.testing.assert_array_equal(cdf_thresholds([1, 0, 3, 0]), np.array([s // 4, s // 4, s, s], np.uint32))
    np.testing.assert_array_equal(cdf_thresholds([0, 1, 1]), np.array([0, s // 2, s], np.uint32))
    np.testing.assert_array_equal(cdf_thresholds([5.0]), np.array([s], np.uint32))
    from srp_jax.errors import ShapeError

    for bad in ([], [1.0, np.nan], [1.0, -0.5], [0.0, 0.0], [[1.0, 2.0]], [np.inf, 1.0]):
        with pytest.raises(ShapeError, match="sampling weights"):
            cdf_thresholds(bad)


def test_inverse_cdf_boundaries_never_pick_zero_weight_rows():
    w = np.array([0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 0.0, 4.0, 0.0])
    t = cdf_thresholds(w)
    # every threshold, one below and one above, plus both ends of [0, 2^31)
    u = np.unique(np.clip(np.concatenate([t.astype(np.int64) + o for o in (-1, 0, 1)] + [[0, 2**31 - 1]]), 0, 2**31 - 1))
    got = np.asarray(rows_from_bits(jnp.asarray(t), jnp.asarray(u.astype(np.uint32))))
    # the row of u by definition: the first i with T[i] > u
    want = np.array([int(np.flatnonzero(t.astype(np.int64) > x)[0]) for x in u])
    np.testing.assert_array_equal(got, want)
    assert set(got.tolist()) == {1, 4, 5, 7} and np.all(w[got] > 0)
    assert int(got[0]) == 1 and int(got[-1]) == 7  # u = 0 and u = 2^31 - 1


def test_inverse_cdf_sampler_matches_the_weights_statistically():
    rng = np.random.default_rng(0)
    V, n = 600, 400_000
    w = 1.0 / np.arange(1, V + 1) ** 1.1 * rng.uniform(0.5, 1.5, V)
    w[rng.choice(V, 60, replace=False)] = 0.0
    w[-3:] = 0.0  # trailing zero-weight rows
    p = w / w.sum()
    idx = np.asarray(sample_rows_inverse_cdf(jax.random.PRNGKey(3), jnp.asarray(cdf_thresholds(w)), n))
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < V
    counts = np.bincount(idx, minlength=V)
    assert counts[p == 0].sum() == 0
    # chi-square over the drawn-from rows: mean df, sd sqrt(2 df); 6 sd is a ~1e-9 false alarm
    pos = p > 0
    expected = n * p[pos]
    chi2 = float(np.sum((counts[pos] - expected) ** 2 / expected))
    df = int(pos.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), chi2
    # and row by row: within 6 binomial standard deviations (+1 for the integer count)
    np.testing.assert_array_less(np.abs(counts - n * p), 6 * np.sqrt(n * p * (1 - p)) + 1)
    # a sampler shifted by one row fails the same statistic (the test can tell)
    shifted = np.bincount(np.minimum(idx + 1, V - 1), minlength=V)
    assert float(np.sum((shifted[pos] - expected) ** 2 / expected)) > 10 * df


def test_draw_rows_samplers_share_the_distribution_and_batch_over_v():
    from types import SimpleNamespace

    w = np.array([0.5, 0.25, 0.125, 0.125])
    data = SimpleNamespace(row_cdf=jnp.asarray(cdf_thresholds(w)), sample_logits=jnp.log(jnp.asarray(w, jnp.float32)))
    for sampler in ("inverse_cdf", "categorical"):
        idx = np.asarray(draw_rows(data, jax.random.PRNGKey(5), 100_000, sampler))
        np.testing.assert_allclose(np.bincount(idx, minlength=4) / idx.size, w, atol=0.006)
    a = np.asarray(draw_rows(data, jax.random.PRNGKey(6), 10))
    assert a.shape == (10,) and np.array_equal(a, np.asarray(draw_rows(data, jax.random.PRNGKey(6), 10)))
    with pytest.raises(ValueError, match="row sampler"):
        draw_rows(data, jax.random.PRNGKey(0), 3, "gumbel")


def test_prism_penalty_matches_direct_computation():
    ds = _dataset()
    fcfg = FactorizerConfig(architecture="topk", d_features=32, k=4)
    params, buffers = F.init_factorizer(jax.random.PRNGKey(3), fcfg, ds.d_model)
    data = TrainData.from_dataset(ds, np.ones(ds.vocab_size) / ds.vocab_size, prism_ranks=3)
    key = jax.random.PRNGKey(9)
    got, _ = selected_prism_loss(fcfg, params, buffers, data, key, 16, 4)
    # replay the same draws, then compute the penalty directly in float64 NumPy
    k_h, k_r = jax.random.split(key)
    h_idx = np.asarray(jax.random.randint(k_h, (16,), 0, ds.hidden_train.shape[0]))
    rank = np.asarray(jax.random.randint(k_r, (16,), 0, 3))
    tok = ds.top_targets[h_idx, rank]
    enc = np.asarray(params["encoder"]["kernel"], np.float64)
    b = np.asarray(params["encoder"]["bias"], np.float64)
    dec = np.asarray(params["decoder"], np.float64)
    x = ds.rows_normalized[tok].astype(np.float64)
    acts = np.maximum(x @ enc + b, 0)
    code = np.zeros_like(acts)
    top = np.argsort(-acts, axis=1)[:, :4]
    np.put_along_axis(code, top, np.take_along_axis(acts, top, 1), 1)
    w_hat = ds.row_mean + ds.row_norms[tok][:, None] * (code @ dec)
    h = ds.hidden_train[h_idx].astype(np.float64)
    w = ds.W_U[tok].astype(np.float64)
    ratio = np.sum(h * (w - w_hat), 1) / np.maximum(np.abs(np.sum(h * w, 1)), 1e-5)
    assert float(got) == pytest.approx(float(np.mean(ratio**2)), rel=1e-4)
    assert (rank > 0).any()  # P = 3 ranks really used


def test_controller_update_hand_computed():
    fcfg = FactorizerConfig(architecture="l1_relu", d_features=16)
    ctrl_cfg = {"enabled": True, "target_l0": 10.0, "kp": 0.2, "ema": 0.9, "warmup_steps": 5, "control_period": 10,
                "err_clip": 0.3, "coeff_init": 1e-3}
    tcfg = TrainingConfig(l0_controller=ctrl_cfg)
    spec = StepSpec.build(fcfg, tcfg, 8, 0)
    assert spec.controller_on
    c0 = {"coeff": jnp.float32(1e-3), "l0_ema": jnp.float32(0.0), "l0_ema_init": jnp.int32(0)}
    c1 = controller_update(spec, c0, jnp.float32(12.0), jnp.int32(3))  # first call copies; warmup: no change
    assert float(c1["l0_ema"]) == 12.0 and float(c1["coeff"]) == pytest.approx(1e-3)
    c2 = controller_update(spec, c1, jnp.float32(14.0), jnp.int32(20))  # ema 12.2 -> err 0.22
    assert float(c2["l0_ema"]) == pytest.approx(12.2, rel=1e-6)
    assert float(c2["coeff"]) == pytest.approx(1e-3 * math.exp(0.2 * 0.22), rel=1e-5)
    c3 = controller_update(spec, c1, jnp.float32(14.0), jnp.int32(21))  # not a control step
    assert float(c3["coeff"]) == pytest.approx(1e-3)
    big = controller_update(spec, c1, jnp.float32(1000.0), jnp.int32(30))  # error clipped to 0.3
    assert float(big["coeff"]) == pytest.approx(1e-3 * math.exp(0.2 * 0.3), rel=1e-5)
    hi = {**c1, "coeff": jnp.float32(0.049)}
    assert float(controller_update(spec, hi, jnp.float32(1000.0), jnp.int32(30))["coeff"]) == pytest.approx(0.05)
    # the controller is ignored for the TopK family
    assert not StepSpec.build(FactorizerConfig(architecture="topk", d_features=16, k=2), tcfg, 8, 0).controller_on


@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0, 40.0])
def test_global_norm_clip_equals_optax(scale):
    # below the threshold (unchanged bits), at it, above it (to a rounding of optax's
    # t / norm * max_norm), a zero gradient; the state is optax's (checkpoints keep one tree)
    from srp_jax.train.step import clip_by_global_norm

    rng = np.random.default_rng(3)
    g = {"a": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32), "b": jnp.asarray(rng.standard_normal(9), jnp.float32)}
    g = jax.tree.map(lambda t: t * scale / float(optax.tree.norm(g)), g)
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert jax.tree.structure(ours.init(g)) == jax.tree.structure(theirs.init(g))
    got, _ = jax.jit(ours.update)(g, ours.init(g))
    want, _ = jax.jit(theirs.update)(g, theirs.init(g))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if scale < 1.0:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-7, atol=0)
    assert float(optax.tree.norm(got)) == pytest.approx(min(scale, 1.0), rel=1e-6)


def test_adamw_with_clip_matches_hand_written_update():
    tcfg = TrainingConfig(lr=1e-2, weight_decay=0.1)
    opt = make_optimizer(tcfg)
    p = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5, -0.5]])}
    g = {"a": jnp.array([3.0, 0.0, -4.0]), "b": jnp.array([[12.0, 0.0]])}  # global norm 13 -> clip
    state = opt.init(p)
    upd, _ = opt.update(g, state, p)
    new = optax.apply_updates(p, upd)
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    gn = math.sqrt(9 + 16 + 144)
    for name in ("a", "b"):
        pv, gv = np.asarray(p[name], np.float64), np.asarray(g[name], np.float64) / gn
        m = (1 - b1) * gv / (1 - b1)
        v = (1 - b2) * gv**2 / (1 - b2)
        want = pv * (1 - lr * wd) - lr * m / (np.sqrt(v) + eps)  # torch.optim.AdamW, step 1
        np.testing.assert_allclose(np.asarray(new[name]), want, rtol=1e-6, atol=1e-7)
    torch = pytest.importorskip("torch")  # and against torch itself, two steps
    tp = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    topt = torch.optim.AdamW([tp], lr=1e-2, weight_decay=0.1)
    pa, st = {"a": p["a"]}, None
    opt1 = make_optimizer(tcfg)
    st = opt1.init(pa)
    for grad in ([0.3, 0.1, -0.2], [-0.1, 0.2, 0.05]):
        topt.zero_grad()
        tp.grad = torch.tensor(grad)
        torch.nn.utils.clip_grad_norm_([tp], 1.0)
        topt.step()
        u, st = opt1.update({"a": jnp.array(grad)}, st, pa)
        pa = optax.apply_updates(pa, u)
    np.testing.assert_allclose(np.asarray(pa["a"]), tp.detach().numpy(), rtol=1e-6)


def test_train_step_matches_hand_assembled_step():
    ds = _dataset()
    fcfg = FactorizerConfig(architecture="topk", d_features=32, k=4)
    tcfg = TrainingConfig(steps=5, batch_size=16, code_l2=1e-3, lambda_prism=0.5)
    spec = StepSpec.build(fcfg, tcfg, ds.d_model, ds.hidden_train.shape[0])
    w = np.ones(ds.vocab_size) / ds.vocab_size
    data = TrainData.from_dataset(ds, w, spec.prism_ranks)
    state = init_train_state(0, fcfg, tcfg, ds.d_model, make_optimizer(tcfg))
    new, m = train_step_jit(spec, state, data)
    key = jax.random.fold_in(state.rng, 1)
    k_rows, k_prism = jax.random.split(key)
    x = data.rows_normalized[draw_rows(data, k_rows, 16)]

    def loss(p):
        code = F.encode(fcfg, p, {}, x, 4)
        rec = jnp.mean((F.decode(p, code) - x) ** 2)
        prism, _ = selected_prism_loss(fcfg, p, {}, data, k_prism, spec.prism_batch, 4)
        return rec + 0.5 * prism + 1e-3 * jnp.mean(code**2), (rec, prism)

    (l, (rec, prism)), g = jax.value_and_grad(loss, has_aux=True)(state.params)
    opt = make_optimizer(tcfg)
    upd, _ = opt.update(g, opt.init(state.params), state.params)
    want = F.normalize_decoder(optax.apply_updates(state.params, upd))
    assert float(m["loss"]) == pytest.approx(float(l), rel=1e-6)
    assert float(m["reconstruction_loss"]) == pytest.approx(float(rec), rel=1e-6)
    assert float(m["prism_loss"]) == pytest.approx(float(prism), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new.params["decoder"]), axis=1), 1.0, atol=1e-6)
    assert int(new.step) == 1 and int(new.l0_count) == 1 and float(new.l0_sum) == pytest.approx(4.0)


def test_jumprelu_decoder_not_renormalised_and_gated_terms():
    ds = _dataset()
    w = np.ones(ds.vocab_size) / ds.vocab_size
    for arch, extra in (("jumprelu", {"l0_coeff": 1e-3}), ("gated", {"gate_l1_coeff": 1e-3})):
        fcfg = FactorizerConfig(architecture=arch, d_features=16)
        tcfg = TrainingConfig(steps=3, batch_size=8, lr=0.05, **extra)
        spec = StepSpec.build(fcfg, tcfg, ds.d_model, 0)
        state = init_train_state(0, fcfg, tcfg, ds.d_model, make_optimizer(tcfg))
        new, m = train_step_jit(spec, state, TrainData.from_dataset(ds, w))
        norms = np.linalg.norm(np.asarray(new.params["decoder"]), axis=1)
        if arch == "jumprelu":
            assert not np.allclose(norms, 1.0, atol=1e-4)
        else:
            np.testing.assert_allclose(norms, 1.0, atol=1e-6)
            assert float(m["loss"]) > float(m["reconstruction_loss"])  # + gated aux recon MSE


def test_row_seeded_init_and_auxk():
    ds = _dataset()
    fcfg = FactorizerConfig(architecture="topk", d_features=16, k=2)
    tcfg = TrainingConfig(init_mode="row_seeded", auxk_coeff=1.0, auxk_dead_steps=2, batch_size=8, steps=6)
    w = np.ones(ds.vocab_size) / ds.vocab_size
    state = init_train_state(0, fcfg, tcfg, ds.d_model, make_optimizer(tcfg), ds.rows_normalized, w)
    dec = np.asarray(state.params["decoder"])
    dist = np.min(np.linalg.norm(dec[:, None, :] - ds.rows_normalized[None], axis=-1), axis=1)
    assert np.all(dist < 1e-5)  # every decoder row is a normalized W_U row
    assert len({tuple(np.round(r, 5)) for r in dec}) == 16  # drawn without replacement (D <= V)
    kernel = np.asarray(state.params["encoder"]["kernel"])
    s = float(kernel.ravel()[np.argmax(np.abs(dec.T).ravel())] / dec.T.ravel()[np.argmax(np.abs(dec.T).ravel())])
    assert 0 < s < 1  # the tie scaled down: k unit rows summed would overshoot
    np.testing.assert_allclose(kernel, s * dec.T, rtol=1e-6, atol=1e-7)  # encoder = s * decoder^T
    assert not np.any(np.asarray(state.params["encoder"]["bias"]))
    # s is the least-squares factor on the training rows: the MSE of s*y is below nearby factors'
    x_all = jnp.asarray(ds.rows_normalized)
    y = np.asarray(F.decode(state.params, F.encode(fcfg, state.params, {}, x_all, 2))) / s
    mse = lambda f: float(np.mean((np.asarray(x_all) - f * y) ** 2))  # noqa: E731
    assert mse(s) <= min(mse(0.9 * s), mse(1.1 * s)) and mse(s) < float(np.mean(np.asarray(x_all) ** 2))
    for mode, want in ((1.0, 1.0), ("inv_k", 0.5)):  # the unscaled tie (the first reading); 1/k
        other = init_train_state(0, fcfg, TrainingConfig(init_mode="row_seeded", row_seeded_scale=mode, steps=6),
                                 ds.d_model, make_optimizer(tcfg), ds.rows_normalized, w)  # fmt: skip
        np.testing.assert_allclose(np.asarray(other.params["encoder"]["kernel"]), want * dec.T, rtol=1e-6)
    # AuxK: zero with no dead latents, positive when some are dead
    x = jnp.asarray(ds.rows_normalized[:8])
    recon = F.decode(state.params, F.encode(fcfg, state.params, {}, x, 2))
    assert float(auxk_loss(state.params, x, recon, jnp.zeros(16, bool), 4)) == 0.0
    assert float(auxk_loss(state.params, x, recon, jnp.ones(16, bool), 4)) > 0.0
    spec = StepSpec.build(fcfg, tcfg, ds.d_model, 0)
    data = TrainData.from_dataset(ds, w)
    for _ in range(4):
        state, m = train_step_jit(spec, state, data)
    assert np.all(np.asarray(state.since_fired) >= 0)
    assert float(m["dead_fraction"]) == pytest.approx(np.mean(np.asarray(state.since_fired) >= 2))


def test_compiled_step_donates_the_state_and_equals_the_composed_step():
    """The loop's path (sampler jitted apart, the step jitted with its state donated) gives
    bitwise the result of the one-call compat step; the donated state's buffers are gone."""
    from srp_jax.train.compiled import compile_training

    ds = _dataset()
    fcfg = FactorizerConfig(architecture="topk", d_features=32, k=4)
    tcfg = TrainingConfig(steps=5, batch_size=16, lambda_prism=0.5, code_l2=1e-3)
    spec = StepSpec.build(fcfg, tcfg, ds.d_model, ds.hidden_train.shape[0])
    data = TrainData.from_dataset(ds, np.ones(ds.vocab_size) / ds.vocab_size, spec.prism_ranks)
    fns = compile_training(spec)
    state = init_train_state(0, fcfg, tcfg, ds.d_model, fns.optimizer)
    want, want_m = train_step_jit(spec, state, data)
    want, want_m = train_step_jit(spec, want, data)
    lowered = fns.step.lower(state, fns.sample(data, state.rng, state.step + 1)).as_text()
    assert "tf.aliasing_output" in lowered  # the state's buffers alias the outputs
    for _ in range(2):
        old = state
        state, m = fns.step(state, fns.sample(data, state.rng, state.step + 1))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m["loss"]) == float(want_m["loss"])


def test_sampler_is_pure_and_prism_off_means_no_prism_batch():
    from srp_jax.train.sampling import sample_batch

    ds = _dataset()
    data = TrainData.from_dataset(ds, np.ones(ds.vocab_size) / ds.vocab_size, 3)
    rng = jax.random.PRNGKey(5)
    a = sample_batch(data, rng, 7, batch_size=8, prism_batch=6)
    b = sample_batch(data, rng, 7, batch_size=8, prism_batch=6)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert a.prism.h.shape == (6, ds.d_model) and a.prism.x.shape == (6, ds.d_model)
    # every prism target row is one of its hidden state's top-3 rows
    logits = np.asarray(a.prism.h) @ ds.W_U.T
    tops = np.argsort(-logits, axis=1)[:, :3]
    rows = [int(np.flatnonzero(np.all(np.isclose(ds.W_U, w), axis=1))[0]) for w in np.asarray(a.prism.w)]
    assert all(r in t for r, t in zip(rows, tops))
    c = sample_batch(data, rng, 8, batch_size=8, prism_batch=0)
    assert c.prism is None and not np.array_equal(np.asarray(c.x), np.asarray(a.x))
    spec_off = StepSpec.build(FactorizerConfig(d_features=8, k=2), TrainingConfig(lambda_prism=0.0), ds.d_model, 20)
    from srp_jax.train.step import sample_batch_for

    assert sample_batch_for(spec_off, data, rng, 1).prism is None


def test_train_data_keeps_only_the_prism_targets_raw_rows():
    """The sampler's data holds the raw W_U rows of the distinct prism targets only, and a prism
    batch's raw row, normalized row and norm are one and the same vocabulary row, bitwise."""
    from srp_jax.train.sampling import sample_batch

    ds = _dataset()
    data = TrainData.from_dataset(ds, np.ones(ds.vocab_size) / ds.vocab_size, 3)
    targets = np.asarray(ds.top_targets)[:, :3]
    distinct = np.unique(targets)
    assert data.target_rows.shape == (distinct.size, ds.d_model) and distinct.size < ds.W_U.shape[0]
    np.testing.assert_array_equal(np.asarray(data.target_rows)[np.asarray(data.target_slots)], np.asarray(ds.W_U)[targets])
    batch = sample_batch(data, jax.random.PRNGKey(11), 3, batch_size=4, prism_batch=64).prism
    x, w, a = (np.asarray(v) for v in (batch.x, batch.w, batch.a))
    normalized = np.asarray(ds.rows_normalized)
    rows = [int(np.flatnonzero(np.all(normalized == xj, axis=1))[0]) for xj in x]
    assert set(rows) <= set(distinct.tolist()) and len(set(rows)) > 1
    np.testing.assert_array_equal(w, np.asarray(ds.W_U)[rows])
    np.testing.assert_array_equal(a, np.asarray(ds.row_norms, np.float32)[rows])
