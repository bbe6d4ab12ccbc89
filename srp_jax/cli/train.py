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

On several devices the run uses the `mesh:` block (default data=-1, model=1: all devices split
the batch); the latent axis is split with mesh.model (see docs/scaling.md):

  srp-jax train --config smoke --set mesh.data=4 --set mesh.model=2 --out-dir /tmp/smoke-mesh

Multi-host runs start the same command on every host. On Cloud TPU (and SLURM, Open MPI,
Kubernetes) jax.distributed finds its peers by itself; elsewhere name them:

  srp-jax train --config smoke --out-dir /shared/run --coordinator host0:8476 --num-processes 2 --process-id 0
  (or SRP_COORDINATOR_ADDRESS / SRP_NUM_PROCESSES / SRP_PROCESS_ID)
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
    dist = parser.add_argument_group("multi-host (jax.distributed)")
    dist.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                      help="auto: start jax.distributed when a coordinator is named or a cluster is detected (default)")
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (= SRP_COORDINATOR_ADDRESS)")
    dist.add_argument("--num-processes", type=int, default=None, help="number of processes (= SRP_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, default=None, help="this process's index (= SRP_PROCESS_ID)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..config import load_run_config

    cfg = load_run_config(args.config, args.overrides, out_dir=args.out_dir, data_path=args.data_path)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from ..sharding import DistributedOptions, initialize_distributed
    from ..train.loop import TrainingInterrupted, train

    initialize_distributed(DistributedOptions.from_env(args.distributed, args.coordinator, args.num_processes, args.process_id))

    try:
        train(cfg, export_pt=args.export_pt)
    except TrainingInterrupted as exc:
        print(f"srp-jax train: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0
