"""Train a TopK dictionary with the plain PyTorch trainer (``bench/torch_reference.py``) on the
same payload, split and config as ``srp-jax train``, and evaluate it with srp-jax's reference-
mode evaluation: the PyTorch side of the "within ±0.02 of a PyTorch reference run" check.

The payload is loaded, split and preprocessed by srp-jax (``srp_jax.data.load_prism_dataset``:
the same kept rows, row statistics, train/validation hidden states and prism targets as a
``srp-jax train`` run of the config), the row-sampling weights are the config's
(``training.row_sampling``); the trainer is the reference's kind of code (dense encode,
``torch.topk``, ``torch.multinomial`` draws, AdamW, decoder renorm). Only the shipped recipe
is supported (constant lr and lambda, random init; TopK, no AuxK), and the run's training keys
are checked for that. The dictionary is evaluated by ``srp_jax.metrics.evaluate(...,
mode="reference")`` on the held-out hidden states, exactly as the loop does, and written as
``OUT/metrics.json`` and ``OUT/checkpoint`` (a loadable srp-jax dictionary).

    python bench/reference_run.py --config smollm2-cpu --data-path data/smollm2 --out runs/torch_ref
    python bench/reference_run.py --config smollm2-cpu --data-path data/smollm2 --out runs/torch_ref \\
        --compare runs/smollm2     # and print the differences to an srp-jax run's metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHIPPED = {"init_mode": "random", "lr_schedule": "constant", "lambda_mode": "constant"}
COMPARED = (  # metrics.json key, tolerance of the acceptance check
    ("row_centered_ev", 0.02),
    ("val_top1_match", 0.02),
    ("val_logit_kl_bits_mean", 0.05),
)


def check_recipe(cfg) -> None:
    """Refuse what the plain trainer does not implement (one line, naming the key)."""
    t, f = cfg.training, cfg.factorizer
    if f.architecture != "topk":
        raise SystemExit(f"reference_run: factorizer.architecture must be topk, got {f.architecture!r}")
    for key, want in SHIPPED.items():
        if getattr(t, key) != want:
            raise SystemExit(f"reference_run: training.{key} must be {want!r} (the shipped recipe), got {getattr(t, key)!r}")
    if t.auxk_coeff > 0:
        raise SystemExit("reference_run: training.auxk_coeff must be 0 (the plain trainer has no AuxK)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", default="smollm2-cpu", help="run config (built-in name or YAML; default smollm2-cpu)")
    parser.add_argument("--data-path", required=True, help="the payload (as for srp-jax train --data-path)")
    parser.add_argument("--out", required=True, help="output folder (metrics.json, history.json, checkpoint/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compare", default=None, metavar="RUN", help="an srp-jax run directory to compare metrics with")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import torch_reference as tr
    from srp_jax.checkpoint import save_dictionary
    from srp_jax.config import load_run_config
    from srp_jax.data import load_prism_dataset, row_sampling_weights
    from srp_jax.dictionary import Dictionary
    from srp_jax.factorizers.state_dict import state_dict_to_variables
    from srp_jax.metrics import evaluate, metrics_to_jsonable

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config, args.overrides, data_path=args.data_path)
    check_recipe(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t, f = cfg.training, cfg.factorizer
    dataset = load_prism_dataset(cfg, cfg.run.seed)
    weights = np.asarray(row_sampling_weights(dataset, t.row_sampling), np.float64)
    ranks = max(1, min(t.prism_top_n, int(np.shape(dataset.top_targets)[1])))
    data = tr.RefData.from_arrays({
        "rows_normalized": np.asarray(dataset.rows_normalized, np.float32), "W_U": np.asarray(dataset.W_U, np.float32),
        "row_mean": np.asarray(dataset.row_mean, np.float32), "row_norms": np.asarray(dataset.row_norms, np.float32),
        "hidden": np.asarray(dataset.hidden_train, np.float32),
        "top_targets": np.asarray(dataset.top_targets)[:, :ranks].astype(np.int64),
    }, weights)  # fmt: skip
    print(f"[reference] {dataset.vocab_size} rows x {dataset.d_model}, {data.hidden.shape[0]} train hidden states; "
          f"D {f.d_features} k {f.k}, b{t.batch_size}, {t.steps} steps, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", file=sys.stderr, flush=True)  # fmt: skip
    trainer = tr.TorchReference(
        data, f.d_features, f.k, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
        lambda_prism=t.lambda_prism, code_l2=t.code_l2, prism_top_n=ranks, seed=cfg.init_seed,
    )  # fmt: skip
    history = []
    t0 = time.perf_counter()
    for step in range(1, t.steps + 1):
        m = trainer.step()
        if step == 1 or step % max(1, t.log_every) == 0 or step == t.steps:
            history.append({"step": step, **{k: m[k] for k in ("loss", "reconstruction_loss", "prism_loss")}})
            rate = step / (time.perf_counter() - t0)
            print(f"[reference] step {step}/{t.steps} loss={m['loss']:.6g} rec={m['reconstruction_loss']:.6g} "
                  f"prism={m['prism_loss']:.6g} {rate:.2f} steps/s", file=sys.stderr, flush=True)  # fmt: skip
    train_seconds = time.perf_counter() - t0

    params, buffers = state_dict_to_variables(trainer.state_dict(), f, dataset.d_model, source="torch reference")
    readout = dataset.readout()
    dictionary = Dictionary(
        config=f, params=params, buffers=buffers, d_model=dataset.d_model, row_mean=readout.row_mean,
        row_norms=readout.row_norms, row_token_ids=np.asarray(readout.row_token_ids),
    )  # fmt: skip
    metrics = dict(evaluate(dictionary, readout, dataset.hidden_val, evaluation=cfg.evaluation, mode="reference"))
    metrics.update({"train_seconds": train_seconds, "trainer": "bench/torch_reference.py", "steps": t.steps})
    metrics = metrics_to_jsonable(metrics)
    save_dictionary(dictionary.replace(metrics=dict(metrics)), out / "checkpoint")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out / "history.json").write_text(json.dumps({"history": history}, indent=2) + "\n")
    print(f"[result] rowEV {metrics['row_centered_ev']:.4f}  top-1 {metrics['val_top1_match']:.4f}  "
          f"KL {metrics['val_logit_kl_bits_mean']:.3f} bits  dead {metrics['dead_feature_rate']:.3f}  "
          f"train {train_seconds:.0f} s -> {out}", file=sys.stderr)  # fmt: skip
    if args.compare:
        theirs = json.loads((Path(args.compare) / "metrics.json").read_text())
        ok = True
        for key, tol in COMPARED:
            diff = theirs[key] - metrics[key]
            ok &= abs(diff) <= tol
            print(f"  {key:24s} srp-jax {theirs[key]:.4f}  torch {metrics[key]:.4f}  diff {diff:+.4f}  (tolerance ±{tol})")
        print("  within tolerance" if ok else "  OUTSIDE tolerance")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
