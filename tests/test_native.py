"""srp_jax._native: the C++ top-k and scatter-add kernels against lax.top_k and sums by hand,
and the loader's build, cache and fallback behaviour (in subprocesses, each with its own cache).

The kernels are checked bitwise where they promise it (top-k: values and indices equal to
``lax.top_k``'s on adversarial rows; the transposed scatter equal to the transpose of the plain
one; two runs equal) and to float32 rounding against a float64 sum by hand. Skipped only where
no C++ compiler is on PATH (where one is, a failed build fails the tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sparse_helpers import scatter_by_hand

from srp_jax import _native

HAVE_COMPILER = shutil.which(os.environ.get("CXX") or "g++") is not None
needs_native = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler on PATH")
REPO = Path(__file__).resolve().parents[1]

SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 2.5, 1e-30, -1e-30, 2.5], np.float32)


@pytest.fixture(scope="module")
def native():
    if HAVE_COMPILER:
        assert _native.load(), "the native kernels failed to build or load"
    return _native


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a, b.view(np.uint32) if b.dtype == np.float32 else b)


@needs_native
@pytest.mark.parametrize("kind", ["specials", "ties", "gaussian", "relu"])
def test_topk_is_bitwise_lax_top_k(native, kind):
    # NaN (both signs), +-0, +-inf, repeated values (ties to the lower index), k = 1 and k = n,
    # rows long enough to compact the candidate buffer several times
    rng = np.random.default_rng({"specials": 0, "ties": 1, "gaussian": 2, "relu": 3}[kind])
    for trial in range(12):
        B, n = int(rng.integers(1, 30)), int(rng.choice([1, 7, 100, 129, 513, 3000]))
        k = int(rng.choice([1, n, max(1, n // 3), min(n, 32), min(n, 130)]))  # 32: the buffer is 128
        if kind == "specials":
            x = rng.choice(SPECIALS, size=(B, n))
        elif kind == "ties":
            x = rng.integers(-3, 4, (B, n)).astype(np.float32)
        else:
            x = rng.standard_normal((B, n)).astype(np.float32)
            if kind == "relu":
                x = np.maximum(x, 0)
        want = jax.jit(lambda a: jax.lax.top_k(a, k))(x)
        got = jax.jit(lambda a: native.topk(a, k))(x)
        _same_bits(got[0], want[0])
        _same_bits(got[1], want[1])


@needs_native
@pytest.mark.parametrize("n, k", [(1024, 32), (1024, 1), (1024, 64), (1024, 65), (9216, 128), (300, 70), (40, 16)])
@pytest.mark.parametrize("kind", ["gaussian", "sparse_relu", "few_positive", "constant", "ties", "rising", "nan_rows"])
def test_topk_group_floor_paths_bitwise(native, n, k, kind):
    # the group-maxima floor (2k strided groups when n >= 4k), its counting (<= 128 groups) and
    # nth_element (> 128) selections, a candidate pass that overflows its buffer (rows of one
    # value, many ties, fewer than k positive entries, an ascending row whose every entry beats
    # the last compaction) and the rank-placed (<= 64 candidates) and sorted finishes
    rng = np.random.default_rng(n * 1000 + k)
    B = 9
    if kind == "gaussian":
        x = rng.standard_normal((B, n))
    elif kind == "sparse_relu":  # mostly zeros, as a masked (AuxK) pre-activation
        x = np.maximum(rng.standard_normal((B, n)) - 2.0, 0.0)
    elif kind == "few_positive":
        x = np.zeros((B, n))
        x[:, rng.integers(0, n, max(1, k // 3))] = rng.random(max(1, k // 3)) + 0.5
    elif kind == "constant":
        x = np.full((B, n), rng.choice([0.0, -0.0, 1.5]))
    elif kind == "ties":
        x = rng.integers(0, 3, (B, n))
    elif kind == "rising":
        x = np.tile(np.arange(n, dtype=np.float64), (B, 1))
    else:
        x = rng.standard_normal((B, n))
        x[:, rng.integers(0, n, 5)] = np.nan
        x[0] = -np.nan
    x = x.astype(np.float32)
    want = jax.jit(lambda a: jax.lax.top_k(a, k))(x)
    got = jax.jit(lambda a: native.topk(a, k))(x)
    _same_bits(got[0], want[0])
    _same_bits(got[1], want[1])


@needs_native
def test_topk_keeps_leading_axes_and_vmaps(native):
    x = np.random.default_rng(4).standard_normal((3, 5, 40)).astype(np.float32)
    got = native.topk(jnp.asarray(x), 6)
    want = jax.lax.top_k(x, 6)
    assert got[0].shape == (3, 5, 6)
    _same_bits(got[1], want[1])
    vm = jax.vmap(lambda a: native.topk(a, 6))(jnp.asarray(x))
    _same_bits(vm[0], want[0])


@needs_native
@pytest.mark.parametrize("B, k, d, W, prefixes", [(9, 12, 37, 50, (3, 7, 12)), (64, 32, 128, 1024, None),
                                                  (3, 1, 8, 2, (1,)), (17, 16, 7, 5, (4, 4, 16))])
def test_combine_and_dot_rows_match_sums_by_hand(native, B, k, d, W, prefixes):
    # repeated indices, d not a multiple of the 8 lanes, equal budgets, k = 1
    rng = np.random.default_rng(B * k + d)
    table = rng.standard_normal((W, d)).astype(np.float32)
    coef = rng.standard_normal((B, k)).astype(np.float32)
    idx = rng.integers(0, W, (B, k)).astype(np.int32)
    got = np.asarray(jax.jit(lambda t, c, i: native.combine_rows(t, c, i, prefixes))(table, coef, idx))
    budgets = (k,) if prefixes is None else prefixes
    assert got.shape == (B, len(budgets), d)
    for p, kp in enumerate(budgets):
        want = np.einsum("bk,bkd->bd", coef[:, :kp].astype(np.float64), table[idx[:, :kp]].astype(np.float64))
        np.testing.assert_allclose(got[:, p], want, rtol=1e-5, atol=1e-5)
    probe = rng.standard_normal((B, 2, d)).astype(np.float32)
    dots = np.asarray(jax.jit(native.dot_rows)(table, probe, idx))
    want = np.einsum("bkd,bpd->bpk", table[idx].astype(np.float64), probe.astype(np.float64))
    np.testing.assert_allclose(dots, want, rtol=1e-5, atol=1e-5)
    # a fixed summation order: two calls give the same bits
    _same_bits(jax.jit(native.dot_rows)(table, probe, idx), dots)


@needs_native
def test_gathered_row_kernels_refuse_bad_input(native):
    table = np.zeros((4, 3), np.float32)
    coef = np.ones((2, 2), np.float32)
    with pytest.raises(Exception, match=r"srp_combine_rows: index 4 out of range \[0, 4\)"):
        jax.block_until_ready(native.combine_rows(table, coef, np.array([[0, 1], [4, 2]], np.int32)))
    with pytest.raises(Exception, match=r"srp_dot_rows: index -1 out of range"):
        jax.block_until_ready(native.dot_rows(table, np.ones((2, 1, 3), np.float32), np.array([[0, -1], [1, 2]], np.int32)))
    for bad in ((2, 1), (), (0, 2), (3,)):
        with pytest.raises(ValueError, match="ascending budgets"):
            native.combine_rows(table, coef, np.zeros((2, 2), np.int32), bad)
    # the kernel's own guard, the wrapper bypassed (XLA skips a call whose output is empty, so
    # no prefixes never reach it; the kernel refuses them all the same)
    call = jax.ffi.ffi_call("srp_combine_rows", jax.ShapeDtypeStruct((2, 2, 3), jnp.float32))
    with pytest.raises(Exception, match="srp_combine_rows: prefixes must ascend"):
        jax.block_until_ready(call(table, coef, np.zeros((2, 2), np.int32), prefixes=np.asarray([2, 1], np.int64)))


@needs_native
def test_topk_stops_at_the_largest_key(native):
    # rows of NaN 0x7fffffff (the largest key): the candidate buffer fills, the k-th best is
    # the largest key, and nothing later can rank
    x = np.full((3, 1024), np.uint32(0x7FFFFFFF).view(np.float32))
    x[1, 700:] = 1.0
    want = jax.lax.top_k(x, 32)
    got = native.topk(jnp.asarray(x), 32)
    _same_bits(got[0], want[0])
    _same_bits(got[1], want[1])


@needs_native
def test_gathered_row_kernels_vmap_and_differentiate(native, monkeypatch):
    from srp_jax.factorizers import sparse as S

    rng = np.random.default_rng(11)
    table = jnp.asarray(rng.standard_normal((20, 9)).astype(np.float32))
    coef = jnp.asarray(rng.standard_normal((3, 6, 4)).astype(np.float32))
    idx = jnp.asarray(rng.integers(0, 20, (3, 6, 4)).astype(np.int32))
    probe = jnp.asarray(rng.standard_normal((3, 6, 9)).astype(np.float32))
    got = jax.vmap(lambda c, i: native.combine_rows(table, c, i)[:, 0])(coef, idx)
    np.testing.assert_allclose(got, np.einsum("nbk,nbkd->nbd", coef, np.asarray(table)[idx]), rtol=1e-5, atol=1e-5)
    dots = jax.vmap(lambda p, i: native.dot_rows(table, p[:, None], i)[:, 0])(probe, idx)
    np.testing.assert_allclose(dots, np.einsum("nbkd,nbd->nbk", np.asarray(table)[idx], probe), rtol=1e-5, atol=1e-5)

    # the public kernels differentiate on the native path as on the XLA one; duplicate and
    # unordered budgets of the reconstruction errors agree too
    c, i, p = coef[0], idx[0], probe[0]
    code = S.SparseCode(c, i)

    def terms():
        grads = jax.grad(lambda t, c, p: jnp.sum(S.combine_rows(t, c, i) ** 2) + jnp.sum(S.dot_rows(t, p, i) ** 2),
                         argnums=(0, 1, 2))(table, c, p)
        return (*grads, S.squared_errors(table, code, p, (4, 2, 4, 3)))

    jax.clear_caches()
    native_terms = terms()
    monkeypatch.setattr(S, "NATIVE_KERNEL_BACKENDS", ())
    jax.clear_caches()
    try:
        for a, b in zip(native_terms, terms()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    finally:
        jax.clear_caches()


@needs_native
@pytest.mark.parametrize("B, k, d, width", [(23, 6, 7, 40), (64, 8, 33, 17), (5, 3, 1, 100), (50, 16, 130, 1000)])
def test_scatter_rows_sums_by_table_row(native, B, k, d, width):
    # repeated features within and across rows, rows never touched (zero), widths that are not
    # a multiple of the kernel's 16-row tiles, d 1
    rng = np.random.default_rng(B)
    idx = rng.integers(0, width, (B, k)).astype(np.int32)
    coef = rng.standard_normal((B, k)).astype(np.float32)
    rows = rng.standard_normal((B, d)).astype(np.float32)
    fn = jax.jit(native.scatter_rows, static_argnums=(3,), static_argnames=("transpose",))
    got = fn(coef, rows, idx, width)
    assert got.shape == (width, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, scatter_by_hand(coef, rows, idx, width), rtol=1e-5, atol=1e-5)
    untouched = np.setdiff1d(np.arange(width), idx)
    assert np.all(np.asarray(got)[untouched] == 0)
    _same_bits(fn(coef, rows, idx, width), got)  # deterministic
    _same_bits(fn(coef, rows, idx, width, transpose=True), np.ascontiguousarray(np.asarray(got).T))


@needs_native
def test_scatter_rows_adds_in_position_order(native):
    # 1 + 1e8 - 1e8 in float32 depends on the order: position order gives (1 + 1e8) - 1e8 = 0
    coef = np.array([[1.0], [1e8], [-1e8]], np.float32)
    rows = np.ones((3, 1), np.float32)
    idx = np.zeros((3, 1), np.int32)
    got = float(native.scatter_rows(coef, rows, idx, 2)[0, 0])
    assert got == float((np.float32(1.0) + np.float32(1e8)) - np.float32(1e8)) == 0.0


@needs_native
def test_scatter_rows_rejects_out_of_range_indices(native):
    with pytest.raises(Exception, match="index 5 out of range"):
        jax.block_until_ready(native.scatter_rows(jnp.ones((2, 2)), jnp.ones((2, 3)), jnp.array([[0, 5], [1, 1]], jnp.int32), 4))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


PROBE = ("import warnings; warnings.simplefilter('always')\n"
         "from srp_jax import _native\n"
         "print('LOADED', _native.load(), _native._state.get('path'))\n")


def test_switched_off_by_environment(tmp_path):
    res = _run(PROBE, SRP_JAX_NATIVE="0", SRP_JAX_CACHE=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "LOADED False None" in res.stdout and "warn" not in res.stderr.lower()
    assert not (tmp_path / "native").exists()  # nothing built


def test_a_failing_compiler_warns_and_falls_back(tmp_path):
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\necho 'bad-cxx 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'broken compiler' >&2\nexit 3\n")
    bad.chmod(0o755)
    res = _run(PROBE, CXX=str(bad), SRP_JAX_CACHE=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "LOADED False None" in res.stdout
    assert "native CPU kernels unavailable" in res.stderr and "broken compiler" in res.stderr
    leftovers = list((tmp_path / "cache").rglob("*.so"))
    assert leftovers == []  # no half-written library left behind
    # and the sparse code still works, through the XLA loops
    res = _run("import jax.numpy as jnp, numpy as np\n"
               "from srp_jax.factorizers import sparse as S\n"
               "p = {'encoder': {'kernel': jnp.eye(4), 'bias': jnp.zeros(4)}}\n"
               "c = S.topk_codes(p, jnp.array([[1., 3., 2., 0.]]), 2)\n"
               "print('CODE', np.asarray(c.indices).tolist(), S.native_kernels())\n",
               CXX=str(bad), SRP_JAX_CACHE=str(tmp_path / "cache"))
    assert "CODE [[1, 2]] False" in res.stdout, res.stderr


@needs_native
def test_builds_once_into_the_cache_and_rebuilds_a_damaged_library(tmp_path):
    res = _run(PROBE, SRP_JAX_CACHE=str(tmp_path))
    assert res.returncode == 0 and "LOADED True" in res.stdout, res.stderr
    (lib,) = list((tmp_path / "native").rglob("libsrp_native.so"))
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left
    stamp = lib.stat().st_mtime_ns
    res = _run(PROBE, SRP_JAX_CACHE=str(tmp_path))  # a second process reuses it
    assert "LOADED True" in res.stdout and lib.stat().st_mtime_ns == stamp
    lib.write_bytes(b"not a library")
    res = _run(PROBE, SRP_JAX_CACHE=str(tmp_path))
    assert "LOADED True" in res.stdout, res.stderr
    assert lib.read_bytes()[:4] == b"\x7fELF"
