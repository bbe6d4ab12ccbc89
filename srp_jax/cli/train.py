"""``srp-jax train``: train one dictionary from a reference-style YAML config."""

from __future__ import annotations

import argparse
import sys

HELP = "train a dictionary from a YAML config (reference keys; resumable)"
DESCRIPTION = """\
Train one readout dictionary from a YAML config (the reference's keys, accepted unchanged).

  srp-jax train --config configs/smoke.yaml --out-dir /tmp/smoke
  srp-jax train --config smoke                       # a built-in config by name
  srp-jax train --config paper/qwen3.5-2b/k256_32x --data-path hLN.pt --out-dir runs/q2b

The run directory gets checkpoint/ (srp-jax), train_state/ (Orbax, for resuming), config.yaml,
metrics.json, history.json, compute_meta.json, feature_labels.json, DONE, and checkpoint.pt
with --export-pt. Rerunning the same command resumes an interrupted run; a finished one
(DONE) is skipped. SIGTERM / Ctrl-C save the state and exit (status 143 / 130).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file, or a built-in name (smoke, smollm2-cpu, paper/<model>/<op>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.steps=200 (repeatable)")
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                        help="run directory (= run.output_dir; --out-dir is an alias)")
    parser.add_argument("--data-path", default=None, help="readout payload (.pt/.npz/.safetensors) (= data.path)")
    parser.add_argument("--export-pt", action="store_true", default=None,
                        help="also write checkpoint.pt in the reference schema (needs the convert extra)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files to OUT/tensorboard (= artifacts.tensorboard; extra 'watch')")
    parser.add_argument("--wandb", metavar="PROJECT", default=None,
                        help="also log to Weights & Biases project PROJECT (= artifacts.wandb_project; needs wandb)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..config import load_run_config

    overrides = list(args.overrides)
    if args.tensorboard:
        overrides.append("artifacts.tensorboard=true")
    if args.wandb:
        overrides.append(f"artifacts.wandb_project={args.wandb}")
    cfg = load_run_config(args.config, overrides, out_dir=args.out_dir, data_path=args.data_path)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from ..train.loop import TrainingInterrupted, train

    try:
        train(cfg, export_pt=args.export_pt)
    except TrainingInterrupted as exc:
        print(f"srp-jax train: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0
