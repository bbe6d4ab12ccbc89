"""``srp-jax demo``: train a dictionary on built-in synthetic data, print its metrics, one
token-logit decomposition and one gated margin explanation."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HELP = "train on built-in synthetic data, print the metrics and one decomposition"
DESCRIPTION = """\
Train the reference smoke dictionary (synthetic readout, 1024 x 128, matryoshka TopK, k = 32)
into --out-dir, print its evaluation metrics, decompose the top-1 logit of a held-out hidden
state into base + features + residual, and gate a top-1 vs top-2 margin.

A finished run directory with the same steps is reused; another --steps in the same directory is
refused (choose another --out-dir, or `srp-jax train --config smoke ... --restart`)."""

METRIC_KEYS = (
    ("row_centered_ev", "rowEV"),
    ("val_top1_match", "top-1 agreement"),
    ("val_logit_kl_bits_mean", "KL (bits)"),
    ("dead_feature_rate", "dead features"),
    ("mean_l0", "mean L0"),
    ("identity_abs_error_max", "identity error (max)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="results/demo", help="run directory (default: results/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the smoke config's 80)")
    parser.add_argument("--top-features", type=int, default=6, help="features to show (default: 6)")


def run(args: argparse.Namespace) -> int:
    from ..data import load_prism_dataset
    from ..decompose import decompose_token_logit
    from ..dictionary import load_factorizer
    from ..gate import explain
    from ..train.loop import train

    overrides = [] if args.steps is None else [f"training.steps={int(args.steps)}"]
    metrics = train("smoke", overrides=overrides, out_dir=args.out_dir)
    out = Path(args.out_dir)
    print(f"\ntrained dictionary: {out}/checkpoint")
    for key, label in METRIC_KEYS:
        value = metrics.get(key)
        if isinstance(value, float):
            text = f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
        else:
            text = str(value)
        print(f"  {label:<22} {text}")

    sae = load_factorizer(out)
    from ..config import load_run_config

    dataset = load_prism_dataset(load_run_config("smoke", [f"run.output_dir={args.out_dir}"]))
    W = dataset.W_U
    h = dataset.hidden_val[0]
    logits = W @ h
    t = int(np.argmax(logits))
    x = dataset.rows_normalized
    d = decompose_token_logit(
        h=h, W_row=W[t], row_mean=sae.row_mean, row_norm=dataset.row_norms[t], row_normalized=x[t],
        model=sae, k=sae.k,
    )
    print(f"\nlogit of token {t} for held-out hidden state 0 (k = {sae.k}):")
    print(
        f"  {float(d.original_logit):.4f} = base {float(d.base_term):.4f} + features {float(d.feature_sum):.4f}"
        f" + residual {float(d.residual_term):.4f}   (identity error {float(d.identity_error):.1e})"
    )
    contrib = np.asarray(d.feature_contributions)
    active = np.asarray(d.active_feature_indices)
    top = active[np.argsort(-np.abs(contrib[active]), kind="stable")][: args.top_features]
    print(f"  {len(active)} active features; largest |contribution|:")
    for f in top:
        print(f"    feature {int(f):>5}  {contrib[f]:+.4f}")

    runner_up = int(np.argsort(-logits, kind="stable")[1])
    e = explain(h, sae, W_U=W, query_kind="pairwise_margin", target_a=t, target_b=runner_up,
                top_features=args.top_features)
    s = e.scores
    verdict = "explained" if e.explained else f"withheld ({e.reason})"
    print(f"\nmargin token {t} - token {runner_up}: exact {s['exact']:.4f}, sparse {s['approx']:.4f}, "
          f"rho {s['rho']:.3f} -> {verdict}")
    for row in e.features or []:
        print(f"    feature {row['feature_id']:>5}  {row['contribution']:+.4f}")
    return 0
