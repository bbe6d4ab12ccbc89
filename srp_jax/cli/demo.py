"""``srp-jax demo``: train a dictionary on built-in synthetic data and show the method working:
what its metrics mean, one explained logit, one withheld explanation, where the outputs are."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train on built-in synthetic data and walk through one explained and one withheld query"
DESCRIPTION = """\
Train the reference smoke dictionary (synthetic readout, 1024 tokens x d_model 128, matryoshka
TopK, 1024 features, k = 32) into --out (default results/smoke_demo; a finished run is reused),
then print:

  * its evaluation metrics and what they mean, next to what the published dictionaries reach;
  * one query the fidelity gate explains: a held-out hidden state's top-1 logit split into
    base + signed feature contributions + residual;
  * one query the gate withholds (a top-1 vs top-2 margin the dictionary cannot preserve), with
    the reason in words;
  * where the outputs are (including checkpoint.pt for the PyTorch reference) and what to try next.

The queries are picked from the data (the first held-out states that pass / fail the gate),
not hard-coded.

examples:
  srp-jax demo
  srp-jax demo --out /tmp/demo --steps 300
"""

OUTPUTS = (
    ("checkpoint/", "the dictionary (srp-jax format): srp_jax.load_factorizer(\"{out}\")"),
    ("checkpoint.pt", "the same dictionary in the PyTorch reference's format"),
    ("metrics.json", "every evaluation metric (the reference's keys)"),
    ("config.yaml", "the merged config the run used"),
    ("history.json", "the training losses"),
    ("feature_labels.json", "each feature's most activating rows"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "--out-dir", dest="out", default="results/smoke_demo",
                        help="run directory (default: results/smoke_demo; --out-dir is an alias)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the smoke config's 80)")
    parser.add_argument("--top-features", type=int, default=5, help="features to show (default: 5)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import hub
    from .._lazy import torch_available
    from ..config import load_run_config
    from ..data import load_prism_dataset
    from ..dictionary import load_factorizer
    from ..gate import explain
    from ..labels import top_rows_by_activation
    from ..train.loop import train

    out = Path(args.out)
    overrides = [] if args.steps is None else [f"training.steps={int(args.steps)}"]
    cfg = load_run_config("smoke", overrides, out_dir=str(out))
    want_pt = torch_available()
    metrics = train(cfg, export_pt=want_pt)
    say = print
    f = cfg.factorizer
    say("")
    say("srp-jax demo: a sparse readout prism on built-in synthetic data")
    say(f"  readout W_U: 1024 tokens x d_model 128; dictionary: {f.architecture}, {f.d_features} features, "
        f"k = {f.native_k}, {cfg.training.steps} steps -> {out}")

    # ---- metrics, explained
    pub = hub.published_ranges()

    def rng(name: str) -> str:
        lo, hi = pub.get(name, (float("nan"), float("nan")))
        return f"published: {lo:.2f}-{hi:.2f}"

    say("\nHow faithfully the sparse dictionary reproduces the readout (held-out hidden states):")
    rows = (
        ("rowEV", metrics.get("row_centered_ev"), "rowEV", "share of the centred W_U rows' energy the sparse codes reconstruct (1 = exact)"),
        ("top-1 agreement", metrics.get("val_top1_match"), "top1", "how often the reconstructed W_U picks the model's own top-1 token"),
        ("KL (bits)", metrics.get("val_logit_kl_bits_mean"), "KL", "divergence of the reconstructed next-token distribution (0 = same)"),
    )
    for label, value, key, meaning in rows:
        text = "-" if not isinstance(value, float) else f"{value:.3f}"
        say(f"  {label:<16} {text:>7}   {meaning}  [{rng(key)}]")
    say(f"  ({metrics.get('dead_feature_rate', float('nan')):.1%} of features never fire; mean L0 "
        f"{metrics.get('mean_l0', float('nan')):.1f} active features per row.) The published numbers come from real models"
        "\n  trained 20k steps (srp-jax hub list); this tiny synthetic run is far below them, so the gate will"
        "\n  withhold many explanations: that is the gate doing its job.")

    # ---- pick one explained and one withheld query from the data
    sae = load_factorizer(out)
    dataset = load_prism_dataset(cfg, cfg.run.seed)
    W = np.asarray(dataset.W_U)
    H = np.asarray(dataset.hidden_val)
    ids = np.asarray(dataset.row_token_ids)
    explained = withheld = None
    for i, h in enumerate(H):
        order = np.argsort(-(W @ h), kind="stable")
        top, runner_up = int(order[0]), int(order[1])
        if explained is None:
            e = explain(h, sae, W_U=W, query_kind="selected_token", target=top, top_features=args.top_features)
            if e.explained:
                explained = (i, top, e)
        if withheld is None:
            e = explain(h, sae, W_U=W, query_kind="pairwise_margin", target_a=top, target_b=runner_up)
            if e.withheld:
                withheld = (i, top, runner_up, e)
        if explained is not None and withheld is not None:
            break

    if explained is not None:
        i, top, e = explained
        s = e.scores
        say(f"\nAn explained logit: held-out hidden state #{i}, its top-1 token {int(ids[top])}")
        say(f"  exact logit {s['exact']:.4f} = base {s['base']:.4f} (h . mean row) + features {s['feature_sum']:+.4f}"
            f" + residual {s['residual']:+.4f}")
        say(f"  gate: explained - {e.reason_text}")
        say(f"  the {len(e.features)} largest of its {s['n_active_features']} feature contributions (signed; "
            "each feature's top tokens in brackets):")
        shown = [row["feature_id"] for row in e.features]
        tops, _ = top_rows_by_activation(sae, dataset.readout(), shown, n=3)
        for row, toks in zip(e.features, tops):
            say(f"    feature {row['feature_id']:>5}  {row['contribution']:+8.4f}   [{' '.join(f'tok_{t}' for t in toks)}]")
    else:
        say("\nNo held-out top-1 logit passes the gate with this dictionary (train longer: --steps 400).")
    if withheld is not None:
        i, a, b, e = withheld
        s = e.scores
        say(f"\nA withheld explanation: held-out hidden state #{i}, margin of token {int(ids[a])} over token {int(ids[b])}"
            " (top-1 vs top-2)")
        say(f"  exact margin {s['exact']:+.4f}, sparse reconstruction {s['approx']:+.4f}, residual {s['residual']:+.4f}")
        say(f"  gate: withheld - {e.reason_text}; no feature explanation is shown for it")
    else:
        say("\nEvery held-out top-1 vs top-2 margin passes the gate.")

    say(f"\nOutputs in {out}/:")
    for name, what in OUTPUTS:
        if (out / name.rstrip("/")).exists():
            say(f"  {name:<20} {what.format(out=out)}")
    if not want_pt:
        say("  (no checkpoint.pt: PyTorch is not installed; pip install 'srp-jax[convert]')")
    say("\nNext:")
    say(f"  srp-jax train --config smoke --set training.steps=400 --out {out}_400   # train longer")
    say("  srp-jax hub list                                  # the 17 published dictionaries")
    say("  README.md 'Decompose a logit': the same decomposition from Python")
    sys.stdout.flush()
    return 0
