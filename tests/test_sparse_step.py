"""The sparse train step equals the dense one: kernels, losses, gradients, whole steps.

Every sparse kernel is checked against its dense formula (``topk_mask`` + ``decode`` with
autodiff through the dense (B, D) code), on small shapes with batches that do not divide the
block size (the padded last block), for topk and matryoshka_topk, with the prism term, code L2
and AuxK. Tolerances: float32 summation-order differences only (~1e-6 relative).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sparse_helpers import scatter_by_hand

from srp_jax import _native
from srp_jax import factorizers as F
from srp_jax.compile import resolve_step_strategy
from srp_jax.config import FactorizerConfig, TrainingConfig
from srp_jax.errors import ConfigError
from srp_jax.factorizers import kernels as K
from srp_jax.factorizers import sparse as S
from srp_jax.train.compiled import compile_training
from srp_jax.train.state import init_train_state
from srp_jax.train.step import StepSpec, TrainData, make_loss_fn, make_optimizer, sample_batch_for

RTOL = 2e-5


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _setup(D=48, d=12, B=37, seed=0):
    kp, kx, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
    cfg = FactorizerConfig("topk", D, 5)
    params, _ = F.init_factorizer(kp, cfg, d)
    # a bias so that some rows have fewer than k positive pre-activations (zeros get selected)
    params["encoder"]["bias"] = jax.random.normal(kb, (D,)) * 0.03 - 0.05
    x = jax.random.normal(kx, (B, d))
    return params, x / jnp.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kernel_path", ["native", "xla"], indirect=True)
@pytest.mark.parametrize("block, unrolled", [(1, 64), (1, 0), (4, 64), (16, 0), (None, 64)])
def test_kernels_match_dense_formulas_for_any_block(block, unrolled, kernel_path, monkeypatch, request):
    # budgets in floats: 1 row, 4 rows (k 5, d 12), 16 rows, one block; the encoder's blocks
    # written out one by one (unrolled 64) or looped over (0)
    monkeypatch.setattr(S, "CPU_BLOCK_ELEMENTS", None if block is None else block * 5 * 12)
    monkeypatch.setattr(S, "CPU_ENCODE_ELEMENTS", None if block is None else max(1, block // 2) * 48)
    monkeypatch.setattr(S, "MAX_UNROLLED_ENCODE_BLOCKS", unrolled)
    monkeypatch.setattr(S, "SLOT_UNROLL", 3)  # k 5 = 3 + 2: the decode's last slot step is padded
    jax.clear_caches()  # traced custom-gradient bodies are cached by function and shapes, not by these
    request.addfinalizer(jax.clear_caches)
    params, x = _setup()
    k, D = 5, 48
    code = S.topk_codes(params, x, k)
    dense = K.topk_mask(jax.nn.relu(K.pre_activation(params, x)), k)
    np.testing.assert_array_equal(np.asarray(S.to_dense(code, D)), np.asarray(dense))
    assert code.indices.dtype == jnp.int32 and np.all(np.diff(np.asarray(code.values), axis=1) <= 0)
    assert np.any(np.asarray(code.values) == 0)  # the zero-selection case is exercised
    recon = K.decode(params, dense)
    np.testing.assert_allclose(S.decode_code(params, code), recon, rtol=1e-6, atol=1e-7)
    errs = S.squared_errors(params["decoder"], code, x, (2, 5, 3))
    for j, kl in enumerate((2, 5, 3)):
        part = K.decode(params, K.topk_mask(jax.nn.relu(K.pre_activation(params, x)), kl))
        np.testing.assert_allclose(errs[j], jnp.sum((part - x) ** 2, axis=-1), rtol=1e-5, atol=1e-7)
    h = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    np.testing.assert_allclose(S.probe_dots(params["decoder"], code, h), jnp.sum(h * recon, -1), rtol=1e-5, atol=1e-6)
    stats, want = S.code_stats(code, D), S.dense_code_stats(dense)
    assert float(stats.l0) == float(want.l0) and np.array_equal(np.asarray(stats.fired), np.asarray(want.fired))
    np.testing.assert_allclose(stats.sum_sq, want.sum_sq, rtol=1e-6)


@pytest.mark.parametrize("kernel_path", ["native", "xla"], indirect=True)
def test_gradients_of_every_sparse_kernel_match_autodiff_of_the_dense_code(kernel_path):
    params, x = _setup(B=29)
    k, D = 5, 48
    h = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    mask = jnp.arange(D) % 3 != 0
    weights = jax.random.normal(jax.random.PRNGKey(4), (2, x.shape[0]))

    def dense_terms(p, x, h):
        acts = jax.nn.relu(K.pre_activation(p, x))
        full = K.topk_mask(acts, k)
        masked = K.topk_mask(jnp.where(mask, acts, 0.0), 4)
        e = [jnp.sum((K.decode(p, K.topk_mask(acts, kl)) - x) ** 2, -1) for kl in (3, 5)]
        return (jnp.sum(weights * jnp.stack(e)) + jnp.sum(h * K.decode(p, full)) * 0.3
                + jnp.sum(full**2) * 0.1 + jnp.sum(K.decode(p, masked) * x))

    def sparse_terms(p, x, h):
        code = S.topk_codes(p, x, k)
        e = S.squared_errors(p["decoder"], code, x, (3, 5))
        masked = S.topk_codes(p, x, 4, mask=mask)
        return (jnp.sum(weights * e) + jnp.sum(S.probe_dots(p["decoder"], code, h)) * 0.3
                + S.code_stats(code, D).sum_sq * 0.1 + jnp.sum(S.decode_code(p, masked) * x))

    want = jax.grad(dense_terms, argnums=(0, 1, 2))(params, x, h)
    got = jax.jit(jax.grad(sparse_terms, argnums=(0, 1, 2)))(params, x, h)
    for name, a, b in zip(("params", "x", "h"), got, want):
        for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert _rel(la, lb) < RTOL, name
    assert _rel(sparse_terms(params, x, h), dense_terms(params, x, h)) < 1e-6


@pytest.mark.parametrize("slot_loop", [True, False])
def test_scatter_and_gather_primitives_by_hand(slot_loop, monkeypatch):
    if not slot_loop:  # the accelerators' decode (one gather of the (B, k, d) rows)
        monkeypatch.setattr(S, "SLOT_DECODE_BACKENDS", ())
    table = jnp.arange(12.0).reshape(4, 3)
    idx = jnp.array([[1, 3], [1, 0]], jnp.int32)
    coef = jnp.array([[2.0, -1.0], [0.5, 1.0]])
    rows = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    want = np.zeros((4, 3))
    for b in range(2):
        for s in range(2):
            want[int(idx[b, s])] += float(coef[b, s]) * np.asarray(rows[b])
    monkeypatch.setattr(S, "SLOT_UNROLL", 1)
    for block in (1, 2):
        np.testing.assert_allclose(S.scatter_add_rows(coef, rows, idx, 4, block), want)
        np.testing.assert_allclose(S.combine_rows(table, coef, idx, block), [2 * table[1] - table[3], 0.5 * table[1] + table[0]])
        np.testing.assert_allclose(S.dot_rows(table, rows, idx, block), [[table[1] @ rows[0], table[3] @ rows[0]], [table[1] @ rows[1], table[0] @ rows[1]]])
    np.testing.assert_allclose(S.scatter_add_values(coef, idx, 4), [1.0, 2.5, 0.0, -1.0])
    with pytest.raises(ValueError, match="levels"):
        S.squared_errors(table, S.SparseCode(coef, idx), rows, (3,))




def _distinct_indices(rng, B, k, width):
    return np.stack([rng.choice(width, k, replace=False) for _ in range(B)]).astype(np.int32)


def test_scatter_plan_groups_entries_by_row_in_position_order():
    rng = np.random.default_rng(0)
    idx = _distinct_indices(rng, 9, 4, 13)
    plan = S.scatter_plan(jnp.asarray(idx), 13)
    feature, source = np.asarray(plan.feature), np.asarray(plan.source)
    flat = idx.reshape(-1)
    # a permutation of the flat positions, each entry naming its own row
    assert sorted(source.tolist()) == list(range(idx.size))
    np.testing.assert_array_equal(feature, flat[source])
    # one chunk here: rows ascending, positions ascending within a row (the unsorted order)
    order = np.lexsort((np.arange(flat.size), flat))
    np.testing.assert_array_equal(source, order)


def test_scatter_plan_splits_into_chunks_when_keys_would_overflow_32_bits():
    # width 2^20 leaves 12 bits of positions: chunks of 4096 // 8 = 512 rows of k 8
    rng = np.random.default_rng(1)
    width, B, k = 1 << 20, 1100, 8
    idx = rng.integers(0, width, (B, k)).astype(np.int32)
    plan = S.scatter_plan(jnp.asarray(idx), width)
    feature, source = np.asarray(plan.feature), np.asarray(plan.source)
    np.testing.assert_array_equal(feature, idx.reshape(-1)[source])
    bounds = [0, 512 * k, 1024 * k, B * k]
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # each chunk holds its own positions, sorted by row
        assert sorted(source[lo:hi].tolist()) == list(range(lo, hi))
        assert np.all(np.diff(feature[lo:hi]) >= 0)
    with pytest.raises(ValueError, match="32-bit"):
        S.scatter_plan(jnp.zeros((2, 4), jnp.int32), 1 << 31)


@pytest.mark.parametrize("sorted_block", [1, 5, 512])
def test_sorted_scatter_equals_the_row_block_scatter(sorted_block, monkeypatch):
    # both equal the sum by hand up to float summation order (padded last loop step: 5), and
    # the grouped scatter is a pure function of its inputs (the same plan gives the same bits)
    monkeypatch.setattr(S, "SORTED_SCATTER_BACKENDS", (jax.default_backend(),))
    monkeypatch.setattr(S, "SORTED_SCATTER_BLOCK", sorted_block)
    rng = np.random.default_rng(2)
    B, k, d, width = 23, 6, 7, 40
    idx = _distinct_indices(rng, B, k, width)
    coef = rng.standard_normal((B, k)).astype(np.float32)
    rows = rng.standard_normal((B, d)).astype(np.float32)
    got = S.scatter_add_rows(jnp.asarray(coef), jnp.asarray(rows), jnp.asarray(idx), width)
    row_blocks = S.scatter_add_rows(jnp.asarray(coef), jnp.asarray(rows), jnp.asarray(idx), width, block=4)
    np.testing.assert_allclose(got, row_blocks, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, scatter_by_hand(coef, rows, idx, width), rtol=1e-5, atol=1e-5)
    plan = S.scatter_plan(jnp.asarray(idx), width)  # a given plan takes the XLA loop, as is
    again = S.scatter_add_rows(jnp.asarray(coef), jnp.asarray(rows), jnp.asarray(idx), width, plan=plan)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(S.scatter_add_rows(
        jnp.asarray(coef), jnp.asarray(rows), jnp.asarray(idx), width, plan=plan)))
    # without a plan the native kernel may run (same order; XLA may fuse products into FMAs)
    np.testing.assert_allclose(np.asarray(again), np.asarray(got), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Whole steps


def _data(V=60, d=12, N=24, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, d)).astype(np.float32)
    mu = W.mean(0)
    a = np.linalg.norm(W - mu, axis=1)
    ds = SimpleNamespace(
        rows_normalized=(W - mu) / a[:, None], W_U=W, row_mean=mu, row_norms=a,
        hidden_train=rng.standard_normal((N, d)).astype(np.float32), top_targets=rng.integers(0, V, (N, 2)),
    )
    return ds, rng.uniform(0.5, 1.5, V)


CASES = {
    "topk": (dict(architecture="topk", d_features=40, k=6), {}),
    "topk_auxk": (dict(architecture="topk", d_features=40, k=6), dict(auxk_coeff=0.5, auxk_k=5, auxk_dead_steps=1)),
    "matryoshka": (dict(architecture="matryoshka_topk", d_features=40, k=4, k_values=(3, 8, 6), matryoshka_weights=(3, 2, 1)), {}),
}


@pytest.mark.parametrize("W, d, rows", [(40, 7, 8), (41, 5, 12), (9, 3, 4), (10, 4, 6), (10, 4, 0)])
@pytest.mark.parametrize("looped", [True, False])
def test_transpose_materialized_is_the_exact_transpose(W, d, rows, looped, monkeypatch):
    # blocks dividing W, a tail block, fewer than two blocks (plain .T), rows 0, other backends
    monkeypatch.setattr(S, "LOOP_TRANSPOSE_BACKENDS", (jax.default_backend(),) if looped else ())
    table = np.random.default_rng(W).standard_normal((W, d)).astype(np.float32)
    got = jax.jit(lambda t: S.transpose_materialized(t, rows))(jnp.asarray(table))
    assert got.shape == (d, W)
    np.testing.assert_array_equal(np.asarray(got), table.T)
    if looped and rows and W >= 2 * rows:  # the loop path really ran: a while loop in the program
        text = jax.jit(lambda t: S.transpose_materialized(t, rows)).lower(jnp.asarray(table)).as_text()
        assert "while" in text


@pytest.fixture
def kernel_path(request, monkeypatch):
    """Parametrized ``"native"`` (srp_jax._native's top-k and scatter-adds; skipped without a
    C++ compiler) or ``"xla"`` (the XLA loops). JAX's jit cache does not key on the module
    constant, so it is cleared around the switch."""
    native = request.param == "native"
    if native and not _native.load():
        pytest.skip("the native kernels did not build here (no C++ compiler?)")
    monkeypatch.setattr(S, "NATIVE_KERNEL_BACKENDS", (jax.default_backend(),) if native else ())
    jax.clear_caches()
    assert S.native_kernels() == native
    yield request.param
    jax.clear_caches()


@pytest.mark.parametrize("kernel_path", ["native", "xla"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_step_loss_and_gradients_equal_the_dense_step(case, kernel_path, monkeypatch):
    # XLA path: the encoder-kernel gradient through the looped transpose (40 latents: 3 blocks
    # + a tail); native path: the scatter kernel writes it transposed
    monkeypatch.setattr(S, "LOOP_TRANSPOSE_BACKENDS", (jax.default_backend(),))
    monkeypatch.setattr(S, "LOOP_TRANSPOSE_ROWS", 12)
    fkw, tkw = CASES[case]
    ds, w = _data()
    fcfg = FactorizerConfig(**fkw)
    specs = {}
    for strategy in ("dense", "sparse"):
        tcfg = TrainingConfig(steps=10, batch_size=19, lambda_prism=0.3, code_l2=1e-2, prism_top_n=2,
                              step_strategy=strategy, **tkw)
        specs[strategy] = StepSpec.build(fcfg, tcfg, 12, ds.hidden_train.shape[0], 2)
    assert specs["sparse"].strategy == "sparse" and specs["dense"].strategy == "dense"
    opt = make_optimizer(specs["dense"].training)
    state = init_train_state(0, fcfg, specs["dense"].training, 12, opt)
    if tkw.get("auxk_coeff"):  # some latents dead, some alive
        state = state.replace(since_fired=jnp.where(jnp.arange(40) % 2 == 0, 5, 0).astype(jnp.int32))
    data = TrainData.from_dataset(ds, w, specs["dense"].prism_ranks)
    batch = sample_batch_for(specs["dense"], data, state.rng, 1)
    out = {}
    for strategy, spec in specs.items():
        fn = jax.jit(jax.value_and_grad(make_loss_fn(spec), has_aux=True))
        (loss, ex), grads = fn(state.params, state, batch)
        out[strategy] = (loss, ex, grads)
    (ld, exd, gd), (ls, exs, gs) = out["dense"], out["sparse"]
    assert _rel(ls, ld) < 1e-6
    for term in ("rec", "prism", "auxk"):
        assert _rel(exs[term], exd[term]) < 1e-5, term
    assert float(exd["prism"]) > 0 and (float(exd["auxk"]) > 0) == bool(tkw.get("auxk_coeff"))
    assert float(exs["step_l0"]) == float(exd["step_l0"])
    assert np.array_equal(np.asarray(exs["fired"]), np.asarray(exd["fired"]))
    for la, lb in zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(gd)):
        assert _rel(la, lb) < RTOL


@pytest.mark.parametrize("kernel_path", ["native", "xla"], indirect=True)
def test_compiled_sparse_steps_track_the_dense_run(kernel_path):
    ds, w = _data()
    fcfg = FactorizerConfig("matryoshka_topk", 40, 4, k_values=(3, 8), matryoshka_weights=(1, 1))
    runs = {}
    for strategy in ("dense", "sparse"):
        tcfg = TrainingConfig(steps=5, batch_size=16, lambda_prism=0.1, step_strategy=strategy)
        spec = StepSpec.build(fcfg, tcfg, 12, ds.hidden_train.shape[0], 2)
        ct = compile_training(spec)
        state = init_train_state(0, fcfg, tcfg, 12, ct.optimizer)
        data = TrainData.from_dataset(ds, w, spec.prism_ranks)
        losses = []
        for _ in range(5):
            state, m = ct.step(state, ct.sample(data, state.rng, state.step + 1))
            losses.append(float(m["loss"]))
        runs[strategy] = (losses, state)
    np.testing.assert_allclose(runs["sparse"][0], runs["dense"][0], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(runs["sparse"][1].params), jax.tree_util.tree_leaves(runs["dense"][1].params)):
        np.testing.assert_allclose(a, b, atol=2e-4)


# --------------------------------------------------------------------------------------------
# Where the strategy is decided


def test_strategy_resolution_per_backend_architecture_and_mesh():
    assert resolve_step_strategy("auto", sparse_supported=True, backend="cpu") == "sparse"
    assert resolve_step_strategy("auto", sparse_supported=True, sparse_fraction=0.5, backend="cpu") == "dense"
    for backend in ("gpu", "tpu", "cuda"):
        assert resolve_step_strategy("auto", sparse_supported=True, backend=backend) == "dense"
    assert resolve_step_strategy("auto", sparse_supported=False, backend="cpu") == "dense"
    assert resolve_step_strategy("auto", sparse_supported=True, backend="cpu", sharded=True) == "dense"
    assert resolve_step_strategy("dense", sparse_supported=True, backend="cpu") == "dense"
    assert resolve_step_strategy("sparse", sparse_supported=True, backend="gpu") == "sparse"
    with pytest.raises(ConfigError, match="not available for architecture 'jumprelu'"):
        resolve_step_strategy("sparse", sparse_supported=False, what="architecture 'jumprelu'")
    with pytest.raises(ConfigError, match="sharded"):
        resolve_step_strategy("sparse", sparse_supported=True, sharded=True)
    with pytest.raises(ConfigError, match="step_strategy"):
        TrainingConfig(step_strategy="fast")


@pytest.mark.parametrize(
    "fkw, available, auto_sparse",
    [
        (dict(architecture="topk", d_features=32, k=4), True, True),  # work 4/32 = 1/8
        (dict(architecture="topk", d_features=32, k=5), True, False),  # 5/32 > 1/8: dense is cheaper
        (dict(architecture="topk", d_features=32, k=32), False, False),  # k >= D: the code is dense
        (dict(architecture="matryoshka_topk", d_features=32, k=4, k_values=(4, 40)), False, False),
        (dict(architecture="matryoshka_topk", d_features=64, k=4, k_values=(2, 4)), True, True),  # 4 x 2 / 64
        # the smoke config: widest code 64, three reconstructions, D 1024 -> 3/16: dense
        (dict(architecture="matryoshka_topk", d_features=1024, k=32, k_values=(16, 32, 64)), True, False),
        (dict(architecture="batch_topk", d_features=32, k=4), False, False),
        (dict(architecture="jumprelu", d_features=32), False, False),
        (dict(architecture="gated", d_features=32), False, False),
        (dict(architecture="l1_relu", d_features=32), False, False),
    ],
)
def test_which_architectures_have_the_sparse_step(fkw, available, auto_sparse):
    fcfg = FactorizerConfig(**fkw)
    assert F.sparse_step_available(fcfg, fcfg.k) is available
    spec = StepSpec.build(fcfg, TrainingConfig(step_strategy="auto"), 8, 10, backend="cpu")
    assert spec.strategy == ("sparse" if auto_sparse else "dense")
    assert StepSpec.build(fcfg, TrainingConfig(step_strategy="auto"), 8, 10, backend="gpu").strategy == "dense"
    if available:
        assert StepSpec.build(fcfg, TrainingConfig(step_strategy="sparse"), 8, 10).strategy == "sparse"
    else:
        with pytest.raises(ConfigError, match="not available"):
            StepSpec.build(fcfg, TrainingConfig(step_strategy="sparse"), 8, 10)


def test_a_mesh_runs_the_dense_step():
    """On a device mesh the step is the dense one: an ``auto`` spec that resolved to sparse is
    switched to dense (the step then equals the dense step's), an explicit ``sparse`` is refused."""
    from jax.sharding import Mesh

    from srp_jax.train.compiled import setup_training

    ds, w = _data()
    fcfg = FactorizerConfig(architecture="topk", d_features=64, k=4)  # 4/64: auto is sparse on CPU
    tcfg = TrainingConfig(batch_size=8, steps=3, lambda_prism=1e-3)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    auto = StepSpec.build(fcfg, tcfg, 12, 24, 2, backend="cpu")
    assert auto.strategy == "sparse"
    assert StepSpec.build(fcfg, tcfg, 12, 24, 2, backend="cpu", sharded=True).strategy == "dense"
    opt = make_optimizer(tcfg)
    on_mesh = setup_training(auto, opt, ds, w, init_seed=0, mesh=mesh)
    assert on_mesh.fns.spec.strategy == "dense"
    dense_cfg = dataclasses.replace(tcfg, step_strategy="dense")
    dense = setup_training(StepSpec.build(fcfg, dense_cfg, 12, 24, 2), opt, ds, w, init_seed=0)
    a, b = on_mesh.init(), dense.init()
    for _ in range(2):
        a, _ = on_mesh.fns.step(a, on_mesh.fns.sample(on_mesh.data, a.rng, a.step + 1))
        b, _ = dense.fns.step(b, dense.fns.sample(dense.data, b.rng, b.step + 1))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    explicit = StepSpec.build(fcfg, dataclasses.replace(tcfg, step_strategy="sparse"), 12, 24, 2, backend="cpu")
    with pytest.raises(ConfigError, match="sharded mesh"):
        setup_training(explicit, opt, ds, w, init_seed=0, mesh=mesh)
