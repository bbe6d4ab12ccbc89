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
  srp-jax train --config smoke --out-dir /tmp/smoke --set training.steps=120 --extend-steps
  srp-jax train --config smoke --out-dir /tmp/smoke --set training.lr=0.003 --restart

The run directory gets checkpoint/ (srp-jax), train_state/ (Orbax, for resuming), config.yaml,
metrics.json, history.json, compute_meta.json, feature_labels.json, DONE, checkpoint.pt with
--export-pt, and srp_run.json: the manifest of the resolved config, the data's fingerprint and
the files this run wrote. One trainer at a time holds a directory (a lock). Rerunning the same
command resumes an interrupted run from its newest intact save, and skips a finished one;
another config or other data is refused, listing what differs (--restart moves the old run
to srp_previous/, --extend-steps lets training.steps grow). A directory holding files srp-jax
did not write is refused before any compute unless --force. See docs/training.md.

exit status: 0 done (or skipped); 2 bad input, or the run directory refused the run;
3 training diverged (a non-finite loss term, gradient or parameter; no DONE);
130 / 143 Ctrl-C / SIGTERM (the state is saved: rerun to resume).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file, or a built-in name (smoke, smollm2-cpu, paper/<model>/<op>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.steps=200 (repeatable)")
    parser.add_argument("--out-dir", default=None, help="run directory (= run.output_dir)")
    parser.add_argument("--data-path", default=None, help="readout payload (.pt/.npz/.safetensors) (= data.path)")
    parser.add_argument("--export-pt", action="store_true", default=None,
                        help="also write checkpoint.pt in the reference schema (needs the convert extra)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    parser.add_argument("--restart", action="store_true",
                        help="move the previous run's files in --out-dir to srp_previous/<time>/ and train from step 0")
    parser.add_argument("--force", action="store_true",
                        help="train into an --out-dir holding files srp-jax did not write (same-named outputs are replaced)")
    parser.add_argument("--extend-steps", action="store_true",
                        help="allow training.steps to grow over the run's recorded value (constant lr / lambda schedules only)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..config import load_run_config

    cfg = load_run_config(args.config, args.overrides, out_dir=args.out_dir, data_path=args.data_path)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from ..train.loop import TrainingInterrupted, train

    try:
        train(cfg, export_pt=args.export_pt, force=args.force, restart=args.restart, extend_steps=args.extend_steps)
    except TrainingInterrupted as exc:
        print(f"srp-jax train: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0
