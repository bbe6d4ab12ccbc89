"""Data: payload readers, synthetic fallback, splits, row subsets, top targets, sampling weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from srp_jax.config import load_run_config
from srp_jax.data import (
    choose_row_subset,
    compute_top_targets,
    drop_padding,
    load_prism_dataset,
    make_synthetic_data,
    read_payload,
    row_sampling_weights,
    split_hidden,
)
from srp_jax.errors import CheckpointError, ConfigError, MissingKeyError, ShapeError


def _tiny(seed=0, V=40, d=6, N=30):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((V, d)).astype(np.float32), rng.standard_normal((N, d)).astype(np.float32)


def test_synthetic_recipe_shapes_and_determinism():
    W, h = make_synthetic_data(7)
    assert W.shape == (1024, 128) and h.shape == (8, 64, 128)
    assert W.dtype == np.float32 and h.dtype == np.float32
    W2, h2 = make_synthetic_data(7)
    assert np.array_equal(W, W2) and np.array_equal(h, h2)
    assert not np.array_equal(W, make_synthetic_data(8)[0])
    Ws, hs = make_synthetic_data(1, vocab_size=64, d_model=16, layers=3, positions=5)
    assert Ws.shape == (64, 16) and hs.shape == (3, 5, 16)
    # per-layer offset 0.15 sin(linspace(0, 6.28, layers)) shifts the layer means
    offsets = 0.15 * np.sin(np.linspace(0, 6.28, 8))
    assert np.allclose(h.mean(axis=(1, 2)), offsets, atol=0.03)
    # W = sparse codes @ latent / sqrt(96) + 0.05 noise: about 5% of the 96 codes are on
    # per row, so E||w||^2 ~ 96*0.05*E[z^2|z>q95]*d/96 + 0.05^2 d  -- rows are far from pure noise
    assert np.median(np.linalg.norm(W, axis=1)) > 3 * 0.05 * np.sqrt(128)


def test_drop_padding_and_split():
    h = np.ones((2, 5, 3), np.float32)
    h[0, 3:] = 0.0
    flat = drop_padding(h)
    assert flat.shape == (8, 3)
    assert drop_padding(np.zeros((2, 2, 3), np.float32)).shape == (4, 3)  # all padding: keep all
    pool = np.arange(20, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    tr, va, ov = split_hidden(pool, 8, 5, seed=11)
    assert tr.shape == (8, 2) and va.shape == (5, 2) and not ov
    assert not set(tr[:, 0]) & set(va[:, 0])
    tr2, va2, _ = split_hidden(pool, 8, 5, seed=11)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    tr3, _, _ = split_hidden(pool, 8, 5, seed=12)
    assert not np.array_equal(tr, tr3)
    # a permutation is applied even when everything is kept
    tr_all, va_all, ov_all = split_hidden(pool, 20, 0, seed=11)
    assert sorted(tr_all[:, 0]) == list(range(20)) and not np.array_equal(tr_all, pool)
    assert ov_all and np.array_equal(va_all, tr_all[:20][:20][: min(64, 20)])


def test_compute_top_targets_matches_numpy():
    W, H = _tiny()
    targets, counts = compute_top_targets(W, H, top_n=8, hidden_batch=7)
    logits = H.astype(np.float64) @ W.T.astype(np.float64)
    expect = np.argsort(-logits, axis=1, kind="stable")[:, :8]
    assert targets.shape == (30, 8)
    assert np.array_equal(targets, expect)
    assert counts.sum() == 30 * 8
    assert np.array_equal(counts, np.bincount(expect.ravel(), minlength=40))
    t3, _ = compute_top_targets(W[:3], H, top_n=8)
    assert t3.shape == (30, 3)


def test_choose_row_subset():
    W, H = _tiny(V=50)
    assert np.array_equal(choose_row_subset(W, H, None, seed=1), np.arange(50))
    mask = np.zeros(50, bool)
    mask[::3] = True
    assert np.array_equal(choose_row_subset(W, H, None, seed=1, token_mask=mask), np.flatnonzero(mask))
    ids = choose_row_subset(W, H, 12, seed=1)
    assert ids.shape == (12,) and len(set(ids.tolist())) == 12
    _, c5 = compute_top_targets(W, H, top_n=5)
    top_half = np.argsort(-c5, kind="stable")[:6]
    assert set(top_half[c5[top_half] > 0]) <= set(ids.tolist())
    assert np.array_equal(ids, choose_row_subset(W, H, 12, seed=1))
    ids_m = choose_row_subset(W, H, 8, seed=2, token_mask=mask)
    assert mask[ids_m].all() and ids_m.shape == (8,)
    with pytest.raises(ShapeError):
        choose_row_subset(W, H, 8, seed=2, token_mask=mask[:10])


def test_row_sampling_weights_every_mode():
    counts = np.array([0, 1, 3, 8, 0], np.int64)
    targets = np.array([[3, 2, 1, 0, 4, 2], [3, 1, 0, 2, 4, 1], [2, 3, 0, 1, 1, 4]], np.int64)
    ds = {"top_counts": counts, "top_targets": targets}
    c = np.maximum(counts, 1.0)
    norm = lambda w: np.asarray(w, float) / np.sum(w)  # noqa: E731
    expect = {
        "uniform": norm(np.ones(5)),
        "frequency": norm(c),
        "frequency_sqrt": norm(np.sqrt(c)),
        "frequency_pow_0.5": norm(np.sqrt(c)),
        "frequency_pow_0.75": norm(c**0.75),
        "hybrid_50freq_50uniform": 0.5 * c / c.sum() + 0.5 / 5,
        "hybrid_80freq_20uniform": 0.8 * c / c.sum() + 0.2 / 5,
        "top1_sqrt_frequency": norm(np.sqrt([1, 1, 1, 2, 1])),  # top-1 ids: 3, 3, 2
        "top5_sqrt_frequency": norm(np.sqrt([3, 4, 3, 3, 2])),
    }
    for mode, want in expect.items():
        got = row_sampling_weights(ds, mode)
        assert np.all(np.isfinite(got)) and np.all(got > 0), mode
        assert got.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=mode)
    np.testing.assert_allclose(row_sampling_weights(ds, None), np.full(5, 0.2))
    np.testing.assert_allclose(row_sampling_weights(ds, "hybrid_.5freq_.5uniform"), expect["hybrid_50freq_50uniform"])
    for bad in ("zipf", "hybrid_50freq", "frequency_pow_x", "frequency_pow_1.2.3", "hybrid_5.0.1freq_1uniform"):
        with pytest.raises(ConfigError, match="row_sampling"):
            row_sampling_weights(ds, bad)


def _payload_arrays(V=30, d=8):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((V, d)).astype(np.float32)
    h = rng.standard_normal((2, 40, d)).astype(np.float32)
    h[1, 30:] = 0.0  # padding
    return W, h


def test_read_payload_formats(tmp_path):
    W, h = _payload_arrays()
    mask = np.ones(30, bool)
    mask[-4:] = False
    np.savez(tmp_path / "p.npz", W_U_orig=W, W_U=W * 0, h_LN=h, token_mask=mask)
    p = read_payload(tmp_path / "p.npz")
    assert np.array_equal(p["W_U"], W) and np.array_equal(p["h_LN"], h) and np.array_equal(p["token_mask"], mask)
    from safetensors.numpy import save_file

    save_file({"W_U": W, "h_LN": h}, str(tmp_path / "p.safetensors"))
    p = read_payload(tmp_path / "p.safetensors")
    assert np.array_equal(p["W_U"], W) and "token_mask" not in p
    torch = pytest.importorskip("torch")
    torch.save({"W_U_orig": torch.from_numpy(W), "h_LN": torch.from_numpy(h).to(torch.bfloat16)}, tmp_path / "p.pt")
    p = read_payload(tmp_path / "p.pt")
    assert np.array_equal(p["W_U"], W) and p["h_LN"].dtype == np.float32
    np.testing.assert_allclose(p["h_LN"], h, atol=0.02)
    np.savez(tmp_path / "bad.npz", W_U=W)
    with pytest.raises(MissingKeyError, match="h_LN"):
        read_payload(tmp_path / "bad.npz")
    np.savez(tmp_path / "dim.npz", W_U=W, h_LN=h[..., :5])
    with pytest.raises(ShapeError, match="hidden dim"):
        read_payload(tmp_path / "dim.npz")
    with pytest.raises(CheckpointError):
        read_payload(tmp_path / "missing.npz")
    # .npy: a folder of one array per key (the folder or any .npy in it); pickles refused
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "W_U_orig.npy", W)
    np.save(folder / "h_LN.npy", h)
    np.save(folder / "token_mask.npy", mask)
    for where in (folder, folder / "h_LN.npy"):
        p = read_payload(where)
        assert np.array_equal(p["W_U"], W) and np.array_equal(p["h_LN"], h) and np.array_equal(p["token_mask"], mask)
    (folder / "h_LN.npy").unlink()
    with pytest.raises(MissingKeyError, match="h_LN"):
        read_payload(folder)
    np.save(folder / "h_LN.npy", np.array([{"W_U": W}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"h_LN\.npy: not a plain \.npy array"):
        read_payload(folder / "W_U_orig.npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no payload arrays"):
        read_payload(empty)


def test_load_prism_dataset_from_payload(tmp_path):
    W, h = _payload_arrays()
    mask = np.ones(30, bool)
    mask[-4:] = False
    np.savez(tmp_path / "p.npz", W_U_orig=W, h_LN=h, token_mask=mask)
    cfg = {"data": {"path": str(tmp_path / "p.npz"), "fallback": "error", "max_hidden": 40, "val_hidden": 20}}
    ds = load_prism_dataset(cfg, seed=0)
    assert ds.source_path == str(tmp_path / "p.npz") and not ds.used_fallback
    assert np.array_equal(ds.row_token_ids, np.arange(26))
    assert ds.hidden_train.shape == (40, 8) and ds.hidden_val.shape == (20, 8)  # 70 non-padding rows
    assert np.all(np.linalg.norm(ds.hidden_train, axis=1) > 0)
    np.testing.assert_allclose(ds.row_mean, W[:26].mean(0), rtol=1e-5, atol=1e-6)  # mean over kept rows
    np.testing.assert_allclose(np.linalg.norm(ds.rows_normalized, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ds.row_norms, np.linalg.norm(W[:26] - W[:26].mean(0), axis=1), rtol=1e-5)
    assert ds.top_targets.shape == (40, 8) and ds.top_counts.sum() == 320
    assert ds.token_labels[:2] == ["tok_0", "tok_1"]
    ds_nomask = load_prism_dataset({"data": {**cfg["data"], "apply_token_mask": False}}, seed=0)
    assert ds_nomask.vocab_size == 30
    readout = ds.readout()
    assert readout.vocab_size == 26 and readout.d_model == 8


def test_load_prism_dataset_fallbacks(monkeypatch, tmp_path):
    cfg = load_run_config("smoke")
    ds = load_prism_dataset(cfg, cfg.run.seed)
    assert ds.used_fallback and ds.source_path == "synthetic"
    assert ds.W_U.shape == (1024, 128) and ds.hidden_train.shape == (256, 128) and ds.hidden_val.shape == (96, 128)
    W, _ = make_synthetic_data(7)
    assert np.array_equal(ds.W_U, W)  # data_seed defaults to run.seed = 7
    monkeypatch.delenv("SRP_NOPE", raising=False)
    with pytest.raises(ConfigError, match="environment variable SRP_NOPE, which is not set"):
        load_prism_dataset({"data": {"path": "${SRP_NOPE}/x.pt", "fallback": "synthetic"}}, seed=0)
    with pytest.raises(CheckpointError, match="never falls back"):  # an explicit path never falls back
        load_prism_dataset({"data": {"path": str(tmp_path / "nope.pt"), "fallback": "synthetic"}}, seed=0)
    with pytest.raises(ConfigError, match="no data.path given"):  # no path: synthetic only when asked for
        load_prism_dataset({"data": {}}, seed=0)
    W, h = _payload_arrays()
    np.savez(tmp_path / "p.npz", W_U=W, h_LN=h)
    monkeypatch.setenv("SRP_NOPE", str(tmp_path))
    ds = load_prism_dataset({"data": {"path": "${SRP_NOPE}/p.npz", "fallback": "error"}}, seed=0)
    assert ds.vocab_size == 30 and not ds.used_fallback


def test_to_device_places_one_copy_and_keeps_matching_jax_arrays():
    from srp_jax._arrays import to_device

    host = np.arange(12, dtype=np.float64).reshape(3, 4)
    placed = to_device(host, np.float32)
    assert isinstance(placed, jax.Array) and placed.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(placed), host.astype(np.float32))
    host[0, 0] = 99.0  # a copy, not a view of the NumPy buffer
    assert float(placed[0, 0]) == 0.0
    assert to_device(placed, np.float32) is placed and to_device(placed) is placed
    assert to_device(placed, np.int32).dtype == np.int32
    assert to_device(np.ones(2, np.float16)).dtype == np.float16  # dtype kept when not given
