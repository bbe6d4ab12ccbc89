"""The benchmark's baselines and harness (bench/): the torch reference against srp-jax on a tiny
problem, the FLOP count by hand, and one end-to-end ``bench/run.py --smoke`` run. No speed
assertions: speed lives in the benchmark's output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import common, srp_adapter  # noqa: E402
from bench import run as run_bench  # noqa: E402
from bench import torch_reference as tr  # noqa: E402

SHAPE = common.Shape("test", d=8, D=32, k=4, V=48, batch=16, n_hidden=20)
HYPER = {"lr": 1e-2, "weight_decay": 0.1, "lambda_prism": 0.5, "code_l2": 1e-3}


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny payload, preprocessed in float64 NumPy (independently of both implementations)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((SHAPE.V, SHAPE.d)).astype(np.float32)
    H = rng.standard_normal((SHAPE.n_hidden, SHAPE.d)).astype(np.float32)
    mu = W.astype(np.float64).mean(0)
    norms = np.maximum(np.linalg.norm(W - mu, axis=1), 1e-8)
    top1 = np.argmax(H.astype(np.float64) @ W.T.astype(np.float64), axis=1)
    weights = rng.uniform(0.5, 2.0, SHAPE.V)
    return {
        "W_U": W, "row_mean": mu.astype(np.float32), "row_norms": norms.astype(np.float32),
        "rows_normalized": ((W - mu) / norms[:, None]).astype(np.float32), "hidden": H,
        "top_targets": top1[:, None].astype(np.int32), "sample_weights": weights / weights.sum(),
    }


@pytest.mark.parametrize("strategy", ["dense", "sparse"])
def test_torch_reference_steps_match_srp_jax_with_injected_indices(strategy):
    arrays = _arrays()
    srp = srp_adapter.make_step(SHAPE, arrays, prism=True, seed=3, strategy=strategy, **HYPER)
    assert srp.spec.strategy == strategy
    init = srp_adapter.state_dict_from_params(srp.params)
    ref = tr.TorchReference(tr.RefData.from_arrays(arrays), SHAPE.D, SHAPE.k, batch_size=SHAPE.batch,
                            seed=0, init_state=init, **HYPER)
    assert ref.prism_batch == srp.spec.prism_batch == 16
    for _ in range(3):  # three steps: AdamW moments and the decoder renorm carry over
        draws = srp_adapter.replay_indices(srp)
        idx = tr.StepIndices(*(torch.from_numpy(draws[key].astype(np.int64)) for key in ("rows", "hidden", "ranks")))
        got = ref.step(idx)
        want = srp.step()
        for key in ("loss", "reconstruction_loss", "prism_loss"):
            assert got[key] == pytest.approx(want[key], rel=2e-5), key
        assert want["prism_loss"] > 0
    ours = srp_adapter.state_dict_from_params(srp.params)
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(value, ours[key], rtol=1e-4, atol=2e-6, err_msg=key)
        assert not np.allclose(value, init[key]), key  # the parameters did move
    np.testing.assert_allclose(np.linalg.norm(ref.state_dict()["decoder"], axis=1), 1.0, atol=1e-6)


def test_torch_reference_prism_term_by_hand():
    arrays = _arrays(1)
    init = common.init_factorizer_arrays(SHAPE.d, SHAPE.D, seed=5)
    ref = tr.TorchReference(tr.RefData.from_arrays(arrays), SHAPE.D, SHAPE.k, batch_size=SHAPE.batch,
                            init_state=init, **HYPER)
    hidden = torch.tensor([0, 3, 3, 19])
    with torch.no_grad():
        got = float(ref.prism_loss(hidden, torch.zeros(4, dtype=torch.int64)))
    enc, dec = init["encoder.weight"].astype(np.float64), init["decoder"].astype(np.float64)
    tok = arrays["top_targets"][hidden.numpy(), 0]
    x = arrays["rows_normalized"][tok].astype(np.float64)
    acts = np.maximum(x @ enc.T, 0)
    code = np.zeros_like(acts)
    top = np.argsort(-acts, axis=1)[:, : SHAPE.k]
    np.put_along_axis(code, top, np.take_along_axis(acts, top, 1), 1)
    w_hat = arrays["row_mean"] + arrays["row_norms"][tok][:, None] * (code @ dec)
    h, w = arrays["hidden"][hidden.numpy()].astype(np.float64), arrays["W_U"][tok].astype(np.float64)
    ratio = np.sum(h * (w - w_hat), 1) / np.maximum(np.abs(np.sum(h * w, 1)), 1e-5)
    assert got == pytest.approx(float(np.mean(ratio**2)), rel=1e-4)


def test_torch_reference_trainer_from_payload():
    arrays = _arrays(2)
    payload = {"W_U": arrays["W_U"], "h_LN": np.concatenate([arrays["hidden"], np.zeros((3, SHAPE.d), np.float32)])}
    data = tr.RefData.from_payload(payload)
    assert data.hidden.shape == (SHAPE.n_hidden, SHAPE.d)  # zero (padding) rows dropped
    logits = arrays["hidden"].astype(np.float64) @ arrays["W_U"].T.astype(np.float64)
    np.testing.assert_array_equal(data.top_targets[:, 0].numpy(), np.argmax(logits, 1))
    assert data.top_targets.shape == (SHAPE.n_hidden, 8)
    np.testing.assert_allclose(data.rows_normalized.norm(dim=1).numpy(), 1.0, atol=1e-6)
    trainer, history = tr.train(payload, d_features=SHAPE.D, k=SHAPE.k, steps=20, batch_size=16, lr=1e-2,
                                lambda_prism=0.1, seed=0, log_every=10)
    assert [row["step"] for row in history] == [1, 10, 20]
    assert history[-1]["reconstruction_loss"] < history[0]["reconstruction_loss"]
    assert all(row["prism_loss"] > 0 for row in history)
    np.testing.assert_allclose(np.linalg.norm(trainer.state_dict()["decoder"], axis=1), 1.0, atol=1e-6)
    # row sampling follows the weights: all mass on row 5 draws only row 5
    w = np.zeros(SHAPE.V)
    w[5] = 1.0
    one, _ = tr.train(payload, SHAPE.D, SHAPE.k, steps=0, batch_size=16, row_sampling=w)
    assert set(one.sample_indices().rows.tolist()) == {5}
    with pytest.raises(ValueError, match="sample_weights"):
        tr.train(payload, SHAPE.D, SHAPE.k, steps=0, row_sampling=-w)


def test_torch_decomposition_and_reconstruction_match_srp_jax():
    import srp_jax

    arrays = _arrays(3)
    state = common.init_factorizer_arrays(SHAPE.d, SHAPE.D, seed=0)
    model = tr.TopKFactorizer(SHAPE.d, SHAPE.D, SHAPE.k)
    model.load_state_dict({key: torch.from_numpy(v) for key, v in state.items()})
    dictionary = srp_adapter.make_dictionary(state, SHAPE.k)
    t = {key: torch.from_numpy(np.asarray(v)) for key, v in arrays.items() if key != "sample_weights"}
    for i, tok in ((0, 7), (4, 30)):
        got = tr.decompose_token_logit(t["hidden"][i], t["W_U"][tok], t["row_mean"], t["row_norms"][tok],
                                       t["rows_normalized"][tok], model, SHAPE.k)
        want = srp_jax.decompose_token_logit(arrays["hidden"][i], arrays["W_U"][tok], arrays["row_mean"],
                                             arrays["row_norms"][tok], arrays["rows_normalized"][tok], dictionary, SHAPE.k)
        np.testing.assert_array_equal(got["active_feature_indices"].numpy(), np.asarray(want.active_feature_indices))
        for key in ("original_logit", "base_term", "feature_sum", "residual_term"):
            assert float(got[key]) == pytest.approx(float(getattr(want, key)), rel=1e-5, abs=1e-6), key
        assert abs(float(got["identity_error"])) < 1e-5
    fs, res = srp_adapter.decompose_batched(dictionary, srp_adapter.make_readout(arrays), arrays["hidden"][:2],
                                            np.array([7, 30]), sparse=True)
    assert float(fs[0]) == pytest.approx(srp_adapter.decompose_per_query(dictionary, arrays, arrays["hidden"][0], 7)[0],
                                         rel=1e-5, abs=1e-6)
    recon_t, _ = tr.reconstruct_rows(model, t["rows_normalized"], t["row_mean"], t["row_norms"], SHAPE.k, row_batch=10)
    recon_j = srp_adapter.reconstruct_all(dictionary, arrays, row_batch=10)
    np.testing.assert_allclose(recon_t.numpy(), np.asarray(recon_j), atol=1e-6)


def test_train_step_flop_count_by_hand():
    s = common.Shape("hand", d=2, D=3, k=1, V=5, batch=4, n_hidden=2)
    f = common.train_step_flops(s, prism=True)
    optimizer = 20 * (2 * 3 * 2 + 3)
    per_row_required = 2 * 2 * 3 + 8 * 1 * 2 + 8 * 2
    per_row_dense = 10 * 2 * 3 + 8 * 2
    assert f["required"] == optimizer + (4 + 2) * per_row_required  # batch 4 + prism batch min(4, 2)
    assert f["dense"] == optimizer + (4 + 2) * per_row_dense
    assert common.train_step_flops(s, prism=False)["required"] == optimizer + 4 * per_row_required


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy 'fast'"):
        srp_adapter.make_step(SHAPE, _arrays(), strategy="fast")


def test_sparsify_adapter_steps():
    pytest.importorskip("sparsify")
    from bench import sparsify_adapter

    arrays = _arrays(4)
    for opt in sparsify_adapter.OPTIMIZERS:
        step = sparsify_adapter.SparsifyStep(SHAPE, arrays, optimizer=opt)
        before = step.sae.encoder.weight.detach().clone()
        losses = [step.step()["loss"] for _ in range(3)]
        assert np.all(np.isfinite(losses))
        assert step.sae.num_latents == SHAPE.D and step.sae.cfg.k == SHAPE.k
        assert not torch.equal(before, step.sae.encoder.weight.detach())


@pytest.mark.slow
def test_run_smoke_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--rounds", "1",
                           "--skip-sparsify", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"train_step_speedup=[\d.]+ sparsify_speedup=n/a decompose_speedup=[\d.]+ "
                        r"recon_speedup=[\d.]+", last), last
    rep = json.loads(out.read_text())
    assert rep["errors"] == [] and rep["mode"] == "smoke"
    m = rep["machine"]
    assert m["cores"] >= 1 and m["versions"]["jax"] and m["versions"]["torch"] and "git_commit" in m
    # what decides the cost of fresh memory is recorded with the machine (bench/README.md)
    assert m["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES")
    assert (m["transparent_hugepage"] is None) == (not run_bench.THP_ENABLED.exists())
    tiny = rep["train"]["tiny"]["prism"]
    for impl in ("srp", "torch"):
        assert tiny[impl]["step_s"] > 0 and tiny[impl]["peak_rss_bytes"] > 0 and tiny[impl]["finite"]
        # the steady peak (timed steps only) is part of the whole measurement's
        assert 0 < tiny[impl]["steady_peak_rss_bytes"] <= tiny[impl]["peak_rss_bytes"]
        assert 0 < tiny[impl]["fraction_of_peak"] < 1
    assert rep["matmul"]["peak_gflops"] > 0
    # the two implementations decompose and reconstruct the same dictionary identically
    assert rep["decompose"]["agreement_rel"] < 1e-4
    assert rep["decompose"]["batched_vs_per_query_agreement_rel"] < 1e-4
    assert rep["recon"]["agreement_rel"] < 1e-4
    # every measurement ran in its own process, alternating implementations
    labels = [r["label"] for r in rep["raw"]]
    assert labels[:2] == ["matmul 256 srp #1", "matmul 256 torch #1"]
    pids = [r["pid"] if "pid" in r else r["results"][0]["pid"] for r in rep["raw"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    # the README's table is rendered from the saved report, measuring nothing
    md = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--from-json", str(out), "--markdown", str(md)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = md.read_text()
    step_s = tiny["srp"]["step_s"]
    row = next(line for line in table.splitlines() if line.startswith("| train step, prism on | tiny |"))
    assert f"{step_s:.3f} s" in row and f"{tiny['torch']['step_s']:.3f} s" in row
    assert f"**{rep['train']['tiny']['speedup_vs_torch']:.2f}×**" in row
    assert table.rstrip().endswith(f"(headline shape {rep['ratios']['headline_shape']})")
    assert f"transparent huge pages {m['transparent_hugepage'] or 'n/a'}, GLIBC_TUNABLES " in table


def test_transparent_hugepage_mode_is_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert run_bench.transparent_hugepages(f) == "madvise"
    f.write_text("[never] madvise always\n")
    assert run_bench.transparent_hugepages(f) == "never"
    f.write_text("always madvise never\n")
    assert run_bench.transparent_hugepages(f) is None
    assert run_bench.transparent_hugepages(tmp_path / "absent") is None


def test_ab_kernels_compiles_each_variant_and_they_agree():
    # the in-process A/B that docs/performance.md quotes: two scatter orders on the tiny shape
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab_kernels.py"), "tiny", "--prism", "--reps", "2",
         "SORTED_SCATTER_BACKENDS=", "SORTED_SCATTER_BACKENDS=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [line for line in proc.stdout.splitlines() if ": median " in line]
    assert len(results) == 2 and results[0].startswith("{'SORTED_SCATTER_BACKENDS': ()}")
    losses = [float(line.rsplit("loss ", 1)[1]) for line in results]
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "ab_kernels.py"), "tiny", "NO_SUCH=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "no setting NO_SUCH" in bad.stderr
