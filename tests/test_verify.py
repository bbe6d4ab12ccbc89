"""srp-jax verify: reproduces a reference checkpoint's own metrics; bootstraps; verdicts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from srp_jax.cli.main import main
from srp_jax.verify import cluster_bootstrap, compare, hidden_positions, parse_tolerances, row_ev_bootstrap

from conftest import load_json, load_npz, random_dictionary, reference_dir

EVAL_KEYS_EXACT = ("eval_rows", "eval_hidden", "k", "contribution_top_k", "topk_overlap")


@pytest.fixture(scope="module")
def reference_payload(tmp_path_factory) -> Path:
    """The reference's own evaluation data as a payload folder: W_U and its 96 held-out states."""
    ds = load_npz("topk", "eval_dataset.npz")
    folder = tmp_path_factory.mktemp("ref") / "payload"
    folder.mkdir()
    np.save(folder / "W_U.npy", ds["W_U"])
    np.save(folder / "h_LN.npy", ds["hidden_val"])
    return folder


def test_reference_mode_reproduces_the_reference_metrics(reference_payload, tmp_path, capsys):
    expected = load_json("topk", "eval_metrics.json")["metrics"]
    (tmp_path / "ref_metrics.json").write_text(json.dumps({"metrics": expected}))
    pt = reference_dir("topk") / "checkpoint.pt"
    orbax = tmp_path / "converted"
    assert main(["convert", str(pt), str(orbax)]) == 0
    for dictionary in (str(pt), str(orbax)):
        report_path = tmp_path / f"{Path(dictionary).name}.json"
        code = main(["verify", dictionary, "--payload", str(reference_payload), "--mode", "reference",
                     "--against", str(tmp_path / "ref_metrics.json"), "--report", str(report_path), "--strict"])
        out = capsys.readouterr().out
        assert code == 0, out
        report = json.loads(report_path.read_text())
        got = report["metrics"]
        for key, want in expected.items():
            if isinstance(want, bool) or key in EVAL_KEYS_EXACT:
                assert got[key] == want, key
            elif isinstance(want, (int, float)):
                assert got[key] == pytest.approx(want, abs=1e-5), key
        assert report["verdict"] == "match"
        verdicts = {r["name"]: r["verdict"] for r in report["comparison"]}
        assert verdicts["rowEV"] == verdicts["top1"] == verdicts["KL"] == "match"
        assert "rowEV" in out and "match" in out and report["published_from"].endswith("ref_metrics.json")


def test_full_mode_on_the_reference_data(reference_payload, tmp_path):
    """All 512 rows are the vocabulary in both modes here, so full mode agrees with the
    reference to float32/float64 round-off, and adds frontier@0.5 and CIs around the means."""
    expected = load_json("topk", "eval_metrics.json")["metrics"]
    report_path = tmp_path / "full.json"
    assert main(["verify", str(reference_dir("topk") / "checkpoint.pt"), "--payload", str(reference_payload),
                 "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    m = report["metrics"]
    assert m["eval_mode"] == "full" and m["eval_rows"] == 512 and m["eval_hidden"] == 96
    assert m["row_centered_ev"] == pytest.approx(expected["row_centered_ev"], abs=1e-6)
    assert m["val_top1_match"] == pytest.approx(expected["val_top1_match"], abs=1e-6)
    assert m["val_logit_kl_bits_mean"] == pytest.approx(expected["val_logit_kl_bits_mean"], rel=1e-5)
    assert 0.0 <= m["frontier_pass_at_0.5"] <= 1.0
    for key in ("row_centered_ev", "val_top1_match", "val_logit_kl_bits_mean", "frontier_pass_at_0.5"):
        lo, hi = report["ci95"][key]
        assert lo <= m[key] + 1e-12 and m[key] <= hi + 1e-12, key
    assert report["published"] is None and report["verdict"] == "n/a"


def test_softcap_from_the_manifest_changes_kl_not_top1(reference_payload, tmp_path):
    payload = tmp_path / "capped"
    shutil.copytree(reference_payload, payload)
    (payload / "manifest.json").write_text(json.dumps({"post_readout_transform": {"type": "tanh_softcap", "cap": 5.0}}))
    pt = str(reference_dir("topk") / "checkpoint.pt")
    assert main(["verify", pt, "--payload", str(payload), "--report", str(tmp_path / "c.json"), "--bootstrap", "0"]) == 0
    assert main(["verify", pt, "--payload", str(payload), "--report", str(tmp_path / "n.json"), "--no-softcap",
                 "--bootstrap", "0"]) == 0
    capped, plain = (json.loads((tmp_path / n).read_text()) for n in ("c.json", "n.json"))
    assert capped["softcap"] == 5.0 and plain["softcap"] is None
    assert capped["metrics"]["val_top1_match"] == plain["metrics"]["val_top1_match"]  # tanh is monotone
    assert capped["metrics"]["val_logit_kl_bits_mean"] < plain["metrics"]["val_logit_kl_bits_mean"]


def test_registry_entry_is_printed_side_by_side_and_strict_fails(tmp_path, capsys):
    d = random_dictionary("topk", d=24, D=80, k=6)
    from srp_jax.checkpoint import save_dictionary

    save_dictionary(d, tmp_path / "dict")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "p.npz", W_U=rng.normal(size=(60, 24)).astype(np.float32),
             h_LN=rng.normal(size=(3, 5, 24)).astype(np.float32))  # fmt: skip
    args = ["verify", str(tmp_path / "dict"), "--payload", str(tmp_path / "p.npz"), "--entry", "qwen3.5-2b/k256_32x",
            "--report", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0.8470" in out and "0.8870" in out and "differs" in out  # published rowEV / top-1 of the entry
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["published"]["row_centered_ev"] == 0.847 and report["verdict"] == "differs"
    assert report["n_prompts"] == 3 and report["n_positions"] == 15
    assert main(args + ["--strict"]) == 1
    assert main(args + ["--tol", "nope=1"]) == 2


def test_cluster_bootstrap_matches_a_loop_written_here():
    rng = np.random.default_rng(5)
    values = rng.normal(size=40)
    clusters = np.repeat(np.arange(8), 5)[rng.permutation(40)]
    lo, hi = cluster_bootstrap(values, clusters, n=50, seed=3)
    draw = np.random.default_rng(3).integers(0, 8, size=(50, 8))
    means = [np.concatenate([values[clusters == c] for c in row]).mean() for row in draw]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    res, x = rng.uniform(size=30), rng.uniform(1, 2, size=30)
    lo, hi = row_ev_bootstrap(res, x, n=20, seed=1)
    draw = np.random.default_rng(1).integers(0, 30, size=(20, 30))
    evs = [1 - res[r].sum() / x[r].sum() for r in draw]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(evs, [2.5, 97.5])), abs=1e-12)
    assert all(math.isnan(v) for v in cluster_bootstrap(np.zeros(0), np.zeros(0)))


def test_hidden_positions_all_and_last():
    h = np.zeros((3, 4, 2), np.float32)
    h[0, :2] = 1.0
    h[1, :4] = 2.0
    h[1, 3] = 3.0
    H, ids = hidden_positions(h, "all")
    assert H.shape == (6, 2) and ids.tolist() == [0, 0, 1, 1, 1, 1]
    H, ids = hidden_positions(h, "last")
    assert ids.tolist() == [0, 1] and H[:, 0].tolist() == [1.0, 3.0]  # prompt 2 is all padding


def test_verdicts_and_tolerances():
    tol = parse_tolerances(["rowEV=0.001"])
    rows = compare({"row_centered_ev": 0.80, "val_top1_match": 0.50, "val_logit_kl_bits_mean": 1.0},
                   {"row_centered_ev": 0.81, "val_top1_match": 0.51, "val_logit_kl_bits_mean": 1.2},
                   {"val_logit_kl_bits_mean": (0.9, 1.3)}, tol)  # fmt: skip
    v = {r["name"]: r["verdict"] for r in rows}
    assert v["rowEV"] == "differs" and v["top1"] == "match" and v["KL"] == "match"  # KL: published inside the CI
    assert v["frontier@0.5"] == "n/a"
