"""``srp-jax train``: train one dictionary from a YAML config, optionally straight from a model."""

from __future__ import annotations

import argparse
import sys

HELP = "train a dictionary from a YAML config, or straight from a model + corpus (resumable)"
DESCRIPTION = """\
Train one readout dictionary from a YAML config (the reference's keys, accepted unchanged).

  srp-jax train --config configs/smoke.yaml --out-dir /tmp/smoke
  srp-jax train --config smoke                       # a built-in config by name
  srp-jax train --config paper/qwen3.5-2b/k256_32x --data-path hLN.pt --out-dir runs/q2b
  srp-jax train --config smoke --out /tmp/smoke --set training.steps=120 --extend-steps
  srp-jax train --config smoke --out /tmp/smoke --set training.lr=0.003 --restart

From a model in one command: --model extracts the payload first (srp-jax extract's recipe and
options), or reuses the cached one for the same model, corpus and extraction settings (under
--payload-cache, default <srp-jax cache>/payloads; an interrupted extraction resumes), then
trains on it. Without --config it uses the built-in smollm2-cpu recipe (16x / k128, shipped).

  srp-jax train --model smollm2 --corpus builtin --out-dir runs/smollm2
  srp-jax train --model my-model.gguf --corpus notes.txt --config my.yaml --out-dir runs/mine

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

On several devices the run uses the `mesh:` block (default data=-1, model=1: all devices split
the batch); the latent axis is split with mesh.model (see docs/scaling.md):

  srp-jax train --config smoke --set mesh.data=4 --set mesh.model=2 --out-dir /tmp/smoke-mesh

Multi-host runs start the same command on every host. On Cloud TPU (and SLURM, Open MPI,
Kubernetes) jax.distributed finds its peers by itself; elsewhere name them:

  srp-jax train --config smoke --out-dir /shared/run --coordinator host0:8476 --num-processes 2 --process-id 0
  (or SRP_COORDINATOR_ADDRESS / SRP_NUM_PROCESSES / SRP_PROCESS_ID)
"""

DEFAULT_MODEL_CONFIG = "smollm2-cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .extract import add_extraction_arguments

    parser.add_argument("--config", default=None,
                        help="YAML config file, or a built-in name (smoke, smollm2-cpu, paper/<model>/<op>); "
                             f"required unless --model is given (then default {DEFAULT_MODEL_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.steps=200 (repeatable)")
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                        help="run directory (= run.output_dir; --out-dir is an alias)")
    parser.add_argument("--data-path", default=None, help="readout payload (.pt/.npz/.safetensors/folder) (= data.path)")
    parser.add_argument("--export-pt", action="store_true", default=None,
                        help="also write checkpoint.pt in the reference schema (needs the convert extra)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files to OUT/tensorboard (= artifacts.tensorboard; extra 'watch')")
    parser.add_argument("--wandb", metavar="PROJECT", default=None,
                        help="also log to Weights & Biases project PROJECT (= artifacts.wandb_project; needs wandb)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    parser.add_argument("--restart", action="store_true",
                        help="move the previous run's files in --out to srp_previous/<time>/ and train from step 0")
    parser.add_argument("--force", action="store_true",
                        help="train into an --out holding files srp-jax did not write (same-named outputs are replaced)")
    parser.add_argument("--extend-steps", action="store_true",
                        help="allow training.steps to grow over the run's recorded value (constant lr / lambda schedules only)")
    group = parser.add_argument_group("from a model (needs the extract extra)")
    add_extraction_arguments(group, model_required=False)
    group.add_argument("--payload-cache", default=None, help="folder of cached payloads (default <srp-jax cache>/payloads)")
    dist = parser.add_argument_group("multi-host (jax.distributed)")
    dist.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                      help="auto: start jax.distributed when a coordinator is named or a cluster is detected (default)")
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (= SRP_COORDINATOR_ADDRESS)")
    dist.add_argument("--num-processes", type=int, default=None, help="number of processes (= SRP_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, default=None, help="this process's index (= SRP_PROCESS_ID)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..config import load_run_config
    from ..errors import ConfigError

    overrides = list(args.overrides)
    if args.tensorboard:
        overrides.append("artifacts.tensorboard=true")
    if args.wandb:
        overrides.append(f"artifacts.wandb_project={args.wandb}")
    config = args.config
    data_path = args.data_path
    if args.model is not None:
        if data_path is not None:
            raise ConfigError("give --model (extract a payload) or --data-path (use one), not both")
        config = config or DEFAULT_MODEL_CONFIG
    elif config is None:
        raise ConfigError("--config is required (or --model to train straight from a model)")
    cfg = load_run_config(config, overrides, out_dir=args.out_dir, data_path=data_path)  # bad config fails first
    if args.print_config and args.model is None:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.model is not None:
        from ..corpus import load_corpus
        from ..extract import cached_payload, require_extract_extra
        from ..sources import resolve_model
        from .extract import settings_from_args

        require_extract_extra("srp-jax train --model")
        settings = settings_from_args(args)
        corpus = load_corpus(args.corpus, min_chars=args.min_chars)
        corpus.prompts(settings.n_prompts)
        spec = resolve_model(args.model, revision=args.revision)
        payload = cached_payload(spec, corpus, settings, cache_dir=args.payload_cache, device=args.device)
        print(f"[train] payload: {payload}", file=sys.stderr, flush=True)
        cfg = load_run_config(config, overrides, out_dir=args.out_dir, data_path=str(payload))
        if args.print_config:
            sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
    from ..sharding import DistributedOptions, initialize_distributed
    from ..train.loop import TrainingInterrupted, train

    initialize_distributed(DistributedOptions.from_env(args.distributed, args.coordinator, args.num_processes, args.process_id))

    try:
        train(cfg, export_pt=args.export_pt, force=args.force, restart=args.restart, extend_steps=args.extend_steps)
    except TrainingInterrupted as exc:
        print(f"srp-jax train: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0
