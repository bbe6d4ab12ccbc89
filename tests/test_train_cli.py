"""End to end: `srp-jax train --config smoke` reaches the reference's quality and writes the run dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from srp_jax.cli.main import main

pytestmark = pytest.mark.slow


def test_smoke_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["train", "--config", "smoke", "--out-dir", str(out), "--export-pt"]) == 0
    for name in ("checkpoint", "train_state", "checkpoint.pt", "config.yaml", "metrics.json", "history.json",
                 "compute_meta.json", "feature_labels.json", "DONE"):
        assert (out / name).exists(), name
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
    labels = json.loads((out / "feature_labels.json").read_text())["features"]
    assert len(labels) == 256 and len(labels[0]["top_token_ids"]) == 6
    assert labels[0]["label"] == "/".join(labels[0]["top_token_labels"][:3])

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

    capsys.readouterr()
    assert main(["train", "--config", "smoke", "--out-dir", str(out)]) == 0
    assert "[skip]" in capsys.readouterr().err

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
    assert "fallback" in capsys.readouterr().err
