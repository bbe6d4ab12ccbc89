"""End to end: `srp-jax train --config smoke` reaches the reference's quality and writes the run dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from srp_jax.cli.main import main

pytestmark = pytest.mark.slow


def test_smoke_run_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("smoke")  # relative, as users type it (Orbax itself wants absolute paths)
    assert main(["train", "--config", "smoke", "--out-dir", str(out), "--export-pt",
                 "--set", "artifacts.report_path=reports/smoke.md"]) == 0
    report = Path("reports/smoke.md").read_text()
    assert report.startswith("# smoke") and "| row_centered_ev |" in report and "architecture: matryoshka_topk" in report
    for name in ("checkpoint", "train_state", "checkpoint.pt", "config.yaml", "metrics.json", "history.json",
                 "compute_meta.json", "feature_labels.json", "DONE"):
        assert (out / name).exists(), name
    # files get ordinary umask permissions (temp files are private until renamed into place)
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("metrics.json", "config.yaml", "checkpoint.pt", "DONE"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert (out / "checkpoint").stat().st_mode & 0o777 == 0o777 & ~mask
    # checkpoint.pt is the reference runner schema, exactly
    import torch

    exported = torch.load(out / "checkpoint.pt", weights_only=True)
    assert list(exported) == ["model_state_dict", "factorizer", "evaluation", "row_mean", "row_norms",
                              "row_token_ids", "metrics"]
    assert type(exported["model_state_dict"]).__name__ == "OrderedDict"
    m = json.loads((out / "metrics.json").read_text())
    # acceptance (the reference gets 0.64 / 0.26 on its own synthetic draw)
    assert m["row_centered_ev"] >= 0.58 and m["val_top1_match"] >= 0.15
    assert m["finite_metrics"] is True and np.isfinite(m["selection_score"])
    assert m["used_fallback_data"] is True and m["data_source"] == "synthetic" and m["architecture"] == "matryoshka_topk"
    assert m["init_seed"] == 7 and m["data_seed"] == 7 and m["l0_controller_enabled"] is False
    hist = json.loads((out / "history.json").read_text())["history"]
    assert [r["step"] for r in hist] == [1, 20, 40, 60, 80]
    assert hist[-1]["loss"] < hist[0]["loss"]
    meta = json.loads((out / "compute_meta.json").read_text())
    assert meta["flops_per_step_est"] == 6 * 256 * 128 * 1024 and meta["steps_run"] == 80
    # smoke: matryoshka widest code 64 x 3 reconstructions / D 1024 > 1/8, so auto keeps the dense step
    assert meta["step_strategy"] == "dense" and meta["row_sampler"] == "inverse_cdf"
    labels = json.loads((out / "feature_labels.json").read_text())["features"]
    assert [r["feature_id"] for r in labels] == list(range(1024))  # every feature
    assert set(labels[0]) == {"feature_id", "label", "top_token_ids", "top_token_labels", "usage_count"}
    assert labels[0]["label"] == "/".join(labels[0]["top_token_labels"][:3])
    assert all(len(r["top_token_ids"]) <= 6 for r in labels) and sum(len(r["top_token_ids"]) == 6 for r in labels) > 900

    # the dictionary round-trips: Orbax dir and .pt agree, and re-evaluating reproduces rowEV
    from srp_jax.data import load_prism_dataset
    from srp_jax.dictionary import load_factorizer
    from srp_jax.metrics import evaluate

    d_dir = load_factorizer(out)
    d_pt = load_factorizer(out / "checkpoint.pt")
    np.testing.assert_array_equal(np.asarray(d_dir.params["decoder"]), np.asarray(d_pt.params["decoder"]))
    assert d_pt.metrics["row_centered_ev"] == pytest.approx(m["row_centered_ev"])
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["run"]["output_dir"] == str(out) and cfg["training"]["steps"] == 80
    ds = load_prism_dataset(cfg, 7)
    again = evaluate(d_dir, ds.readout(), ds.hidden_val, evaluation=cfg["evaluation"])
    assert again["row_centered_ev"] == pytest.approx(m["row_centered_ev"], abs=1e-6)
    # feature_labels.json: each feature's top rows by encoder activation (NumPy brute force)
    acts = np.maximum(np.asarray(ds.rows_normalized, np.float64) @ np.asarray(d_dir.params["encoder"]["kernel"], np.float64)
                      + np.asarray(d_dir.params["encoder"]["bias"], np.float64), 0.0)  # fmt: skip
    for r in labels[::97]:
        col = acts[:, r["feature_id"]]
        expect = np.argsort(-col, kind="stable")[: len(r["top_token_ids"])]
        assert np.all(col[expect] > 0) and (len(r["top_token_ids"]) == 6 or np.sum(col > 0) == len(r["top_token_ids"]))
        np.testing.assert_allclose(col[np.asarray(ds.readout().positions(r["top_token_ids"]))], col[expect], rtol=1e-4, atol=1e-6)
        assert r["top_token_labels"] == [f"tok_{t}" for t in r["top_token_ids"]]

    capsys.readouterr()
    assert main(["train", "--config", "smoke", "--out-dir", str(out)]) == 0
    assert "[skip]" in capsys.readouterr().err

    # the README's first command, `srp-jax demo`, on this finished run: the metrics and what
    # they mean, one explained logit (its identity holds), one withheld margin, the outputs
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"rowEV              {m['row_centered_ev']:.3f}" in printed and "published:" in printed
    line = next(ln for ln in printed.splitlines() if "exact logit" in ln)
    numbers = [float(tok) for tok in line.replace("(h . mean row)", "").split() if tok.lstrip("+-").replace(".", "").isdigit()]
    exact, base, feats, resid = numbers
    assert abs(exact - (base + feats + resid)) <= 2e-4  # 4-decimal printing
    explained, withheld = printed.split("An explained logit", 1)[1].split("A withheld explanation", 1)
    assert "gate: explained - " in explained and explained.count("    feature ") == 5
    assert "gate: withheld - " in withheld and "no feature explanation is shown" in withheld
    assert "    feature " not in withheld.split("Outputs in", 1)[0]
    assert "checkpoint.pt        the same dictionary" in printed and "Next:" in printed

    # a finished run asked for --export-pt again writes the .pt from its checkpoint/
    (out / "checkpoint.pt").unlink()
    assert main(["train", "--config", "smoke", "--out-dir", str(out), "--export-pt"]) == 0
    assert "[export]" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(load_factorizer(out / "checkpoint.pt").params["decoder"]),
                                  np.asarray(d_dir.params["decoder"]))

    # relative paths through convert, both directions
    assert main(["convert", "smoke", "back.pt"]) == 0
    assert main(["convert", "back.pt", "again"]) == 0
    np.testing.assert_array_equal(np.asarray(load_factorizer("again").params["decoder"]), np.asarray(d_dir.params["decoder"]))
    capsys.readouterr()

    # the README's quickstart block runs verbatim against this run directory
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Decompose a logit", 1)[1]
    block = section.split("```python", 1)[1].split("```", 1)[0]
    assert "results/smoke_demo/checkpoint.pt" in block
    namespace: dict = {}
    exec(block.replace("results/smoke_demo", str(out)), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "active features:" in printed
    result = namespace["result"]
    assert abs(float(result.identity_error)) <= 1e-5
    assert len(result.active_feature_indices) <= namespace["sae"].k == 32


def test_cli_print_config_and_errors(capsys):
    assert main(["train", "--config", "smoke", "--set", "training.steps=5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 5" in printed and "matryoshka_topk" in printed
    assert main(["train", "--config", "smoke", "--set", "training.stepz=3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--config", "paper/qwen3.5-2b/k256_32x", "--out-dir", "/tmp/srp-never"]) == 2
    assert "SRP_DATA_ROOT, which is not set" in capsys.readouterr().err


def test_run_report_failure_notes():
    from srp_jax.train.loop import run_report

    healthy = run_report("r", {"dead_feature_rate": 0.1, "top1_logit_residual_frac_mean": 0.3, "val_top1_match": 0.9,
                               "finite_metrics": True}, {"training": {"steps": 3}})
    assert "## Failure notes\n\nnone\n" in healthy and "| val_top1_match | 0.9 |" in healthy
    assert "```yaml\ntraining:\n  steps: 3\n```" in healthy
    failing = run_report("r", {"dead_feature_rate": 0.85, "top1_logit_residual_frac_mean": 1.5, "val_top1_match": 0.2,
                               "finite_metrics": True}, {})
    notes = failing.split("## Failure notes", 1)[1].split("## Config", 1)[0]
    assert notes.count("\n- ") == 3 and "dead_feature_rate = 0.85" in notes and "val_top1_match = 0.2" in notes
    edge = run_report("r", {"dead_feature_rate": 0.8, "top1_logit_residual_frac_mean": 1.0, "val_top1_match": 0.25,
                            "finite_metrics": False, "row_centered_ev": float("nan")}, {})
    notes = edge.split("## Failure notes", 1)[1].split("## Config", 1)[0]
    assert notes.count("\n- ") == 1 and "not finite" in notes  # the thresholds are strict



def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--config", "smoke", "--data-path", str(tmp_path / "missing.npz"),
                 "--set", "data.fallback=error", "--out", str(out)]) == 2
    assert "missing.npz" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, W_U=np.ones((4, 3), np.float32), h_LN=np.ones((2, 5), np.float32))  # d 3 vs 5
    assert main(["train", "--config", "smoke", "--data-path", str(bad), "--out", str(out)]) == 2
    assert "does not match" in capsys.readouterr().err and not out.exists()
    # a step the config cannot have is refused before the run directory is written, so the
    # corrected command then simply runs (no manifest of the refused config left behind)
    for bad_step in (["factorizer.architecture=jumprelu", "training.step_strategy=sparse"],
                     ["factorizer.architecture=jumprelu", "training.auxk_coeff=0.1"]):
        argv = ["train", "--config", "smoke", "--out", str(out), "--set", "training.steps=2"]
        assert main(argv + [x for s in bad_step for x in ("--set", s)]) == 2
        err = capsys.readouterr().err
        assert ("step_strategy" in err or "auxk_coeff" in err) and not out.exists(), err
